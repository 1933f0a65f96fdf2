//! How backups name their S3 bucket, against SeaweedFS: path style unless `pathStyle: false`, the
//! bucket before the host (`BUCKET.localhost`) when virtual-hosted style is asked for or the endpoint
//! is the bucket's own address, with and without a key prefix; and a backup the store does not list back is never reported created.

mod common;

use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use atlas_runner::api::{BackupStore, S3Store};
use atlas_runner::backup::store::Store;
use atlas_runner::backup::{self, BackupError, CreateOptions};
use atlas_testbed::{TestBucket, TestS3, create_bucket, start_s3_with_domain, unique};
use common::{DataDir, s3_credentials};

/// A data dir with a small world, removed on drop.
fn small_world() -> Result<DataDir> {
    let data = DataDir::new("s3-addressing", "world")?;
    std::fs::create_dir_all(data.0.join("world/region"))?;
    std::fs::write(data.0.join("world/level.dat"), "level")?;
    std::fs::write(data.0.join("world/region/r.0.0.mca"), vec![7u8; 10_000])?;
    Ok(data)
}

fn spec(bucket: &TestBucket, endpoint: &str, prefix: &str, path_style: Option<bool>) -> BackupStore {
    BackupStore {
        s3: Some(S3Store {
            bucket: bucket.name.clone(),
            prefix: prefix.to_owned(),
            endpoint: Some(endpoint.to_owned()),
            region: bucket.region.clone(),
            path_style,
            credentials_secret_ref: None,
            credentials_file: None,
        }),
        local: None,
    }
}

/// The bed's endpoint with its host given by name: `BUCKET.localhost` is then the bucket's
/// virtual-hosted address, which the runner resolves to loopback itself.
fn by_name(endpoint: &str) -> String {
    endpoint.replace("127.0.0.1", "localhost")
}

/// Whether `key` exists in `bucket`, asked by an independent path-style request.
async fn exists(bucket: &TestBucket, key: &str) -> Result<bool> {
    let url = bucket.presign("HEAD", key)?;
    let status = reqwest::Client::builder().no_proxy().build()?.head(url).send().await?.status();
    ensure!(status.is_success() || status == reqwest::StatusCode::NOT_FOUND, "HEAD {key}: {status}");
    Ok(status.is_success())
}

#[tokio::test]
async fn a_backup_lands_in_the_named_bucket_under_the_prefix_whatever_the_addressing() -> Result<()> {
    let s3 = TestS3::shared().await?;
    let ip = s3.endpoint().endpoint.clone();
    let cases = [
        ("pathStyle omitted", ip.clone(), None),
        ("pathStyle omitted, host by name", by_name(&ip), None),
        ("pathStyle: true", ip.clone(), Some(true)),
        ("pathStyle: false", by_name(&ip), Some(false)),
        // The bucket's own virtual-hosted address, as object_store's convention writes it.
        ("pathStyle omitted, the bucket's address", by_name(&ip).replace("localhost", "BUCKET.localhost"), None),
    ];
    for (how, endpoint, path_style) in cases {
        for prefix in ["", "survival/"] {
            let what = format!("{how}, prefix {prefix:?}");
            let bucket = s3.bucket("addressing").await?;
            let endpoint = endpoint.replace("BUCKET", &bucket.name);
            let data = small_world()?;
            let store = Store::open(
                Some(&spec(&bucket, &endpoint, prefix, path_style)),
                &data.0,
                Some(s3_credentials(&bucket.s3)),
            )?;
            let created = backup::create(&store, &CreateOptions::new(&data.0)).await.with_context(|| what.clone())?;
            let listed = backup::list(&store).await.with_context(|| what.clone())?;
            ensure!(
                listed.iter().map(|m| &m.name).collect::<Vec<_>>() == [&created.name],
                "{what}: backup list shows {listed:?}"
            );
            for key in [
                format!("{prefix}manifests/{}.json", created.name),
                format!("{prefix}archives/{}.tar.zst", created.name),
            ] {
                ensure!(exists(&bucket, &key).await?, "{what}: {key} is not in bucket {}", bucket.name);
            }
            // And it reads back whole.
            let scratch = tempfile::tempdir()?;
            backup::verify(&store, &created.name, scratch.path()).await.with_context(|| what.clone())?;
        }
    }
    Ok(())
}

#[test]
fn backup_create_and_list_with_path_style_omitted_from_the_command_line() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let bucket = runtime.block_on(async { TestS3::shared().await?.bucket("addressing-cli").await })?;
    let data = small_world()?;
    let creds = data.0.join("s3.env");
    std::fs::write(
        &creds,
        format!("AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\n", bucket.s3.access_key, bucket.s3.secret_key),
    )?;
    // The spec, as a user writes it: an endpoint, a prefix, no pathStyle.
    let spec = data.0.join("server.yaml");
    std::fs::write(
        &spec,
        format!(
            "eula: true\nserver: {{type: vanilla}}\nbackup:\n  store:\n    s3: {{bucket: {}, prefix: survival/, endpoint: \"{}\", region: {}, credentialsFile: \"{}\"}}\n",
            bucket.name,
            bucket.s3.endpoint,
            bucket.region,
            creds.display()
        ),
    )?;
    let run = |command: &str| -> Result<String> {
        let out = Command::new(common::binary())
            .args(["backup", command, "--json", "--spec"])
            .arg(&spec)
            .arg("--data")
            .arg(&data.0)
            .output()?;
        ensure!(out.status.success(), "backup {command}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?)
    };
    let created: serde_json::Value = serde_json::from_str(&run("create")?)?;
    let name = created["name"].as_str().context("no name in backup create's output")?;
    let listed: serde_json::Value = serde_json::from_str(&run("list")?)?;
    let names: Vec<&str> = listed.as_array().context("a list")?.iter().filter_map(|m| m["name"].as_str()).collect();
    ensure!(names == [name], "backup list shows {names:?}, created {name}");
    runtime.block_on(async {
        ensure!(
            exists(&bucket, &format!("survival/manifests/{name}.json")).await?,
            "not under the prefix in {}",
            bucket.name
        );
        Ok(())
    })
}

#[tokio::test]
async fn a_backup_the_store_files_elsewhere_is_refused_and_removed() -> Result<()> {
    // SeaweedFS as it ships reads the bucket from the path only: a virtual-hosted request
    // (`BUCKET.localhost/survival/manifests/...`) lands in a bucket named after the first path
    // segment, and a read of the same key finds it there, while the listing finds nothing.
    let private = tokio::task::spawn_blocking(|| start_s3_with_domain(None)).await??;
    let endpoint = private.endpoint.clone();
    let name = unique("elsewhere").to_lowercase();
    create_bucket(&endpoint, &name).await?;
    let bucket = TestBucket { s3: endpoint.clone(), name, region: "us-east-1".to_owned() };
    for prefix in ["survival/", ""] {
        let data = small_world()?;
        let store = Store::open(
            Some(&spec(&bucket, &by_name(&endpoint.endpoint), prefix, Some(false))),
            &data.0,
            Some(s3_credentials(&endpoint)),
        )?;
        match backup::create(&store, &CreateOptions::new(&data.0)).await {
            Ok(m) => bail!("prefix {prefix:?}: reported created: {}", m.name),
            Err(e @ BackupError::NotListedBack { .. }) => {
                let BackupError::NotListedBack { key, .. } = &e else { unreachable!() };
                let message = e.to_string();
                ensure!(message.contains("pathStyle"), "{message}");
                // Nothing left where the store put it: the bucket the first path segment named.
                let backup_name = key.rsplit('/').next().and_then(|f| f.strip_suffix(".json")).context("key")?;
                for object in [format!("manifests/{backup_name}.json"), format!("archives/{backup_name}.tar.zst")] {
                    let full = format!("{prefix}{object}");
                    let (first, rest) = full.split_once('/').context("a key with a directory")?;
                    let elsewhere =
                        TestBucket { s3: endpoint.clone(), name: first.to_owned(), region: "us-east-1".to_owned() };
                    ensure!(!exists(&elsewhere, rest).await?, "prefix {prefix:?}: {rest} left in bucket {first}");
                }
            }
            Err(e) => bail!("prefix {prefix:?}: refused for another reason: {e:#}"),
        }
    }
    Ok(())
}
