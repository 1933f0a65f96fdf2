//! The test bed's S3 endpoint is a real, signature-checking S3: tests that rely on it can trust it.

use anyhow::{Context, Result, ensure};
use atlas_testbed::TestS3;

#[tokio::test]
async fn s3_buckets_are_fresh_and_signatures_are_checked() -> Result<()> {
    let s3 = TestS3::shared().await?;
    let bucket = s3.bucket("bed").await?;
    let http = reqwest_client()?;

    let put = http.put(bucket.presign("PUT", "hello.txt")?).body("hello").send().await?;
    assert!(put.status().is_success(), "PUT: {}", put.status());
    let got = http.get(bucket.presign("GET", "hello.txt")?).send().await?;
    assert_eq!(got.text().await?, "hello");

    // A request signed with the wrong secret is refused.
    let mut wrong = bucket.clone();
    wrong.s3.secret_key.push('x');
    let denied = http.get(wrong.presign("GET", "hello.txt")?).send().await?;
    assert_eq!(denied.status().as_u16(), 403);

    // Another bucket does not see the object.
    let other = s3.bucket("bed").await?;
    assert_ne!(other.name, bucket.name);
    let missing = http.get(other.presign("GET", "hello.txt")?).send().await?;
    assert_eq!(missing.status().as_u16(), 404);
    Ok(())
}

/// SeaweedFS would report cluster statistics to telemetry.seaweedfs.com by default; whether it does
/// cannot be seen without letting it send, so the check reads the flag in its command line.
#[test]
fn seaweedfs_is_started_with_its_telemetry_off() -> Result<()> {
    let s3 = atlas_testbed::start_s3()?;
    let pid = s3.processes.pid("weed").context("no weed process")?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    ensure!(
        args.iter().any(|a| a == "-master.telemetry=false"),
        "weed was started without -master.telemetry=false: {args:?}"
    );
    Ok(())
}

/// SeaweedFS puts its gRPC sockets in /tmp whatever its flags say, and a killed one cannot remove
/// them: the bed gives it a /tmp of its own, so an outage test or a reaper's SIGKILL leaves nothing.
#[test]
fn a_killed_seaweedfs_leaves_no_socket_on_the_machine() -> Result<()> {
    let sockets = || -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir("/tmp")?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("seaweedfs-") && n.ends_with(".sock"))
            .collect();
        names.sort();
        Ok(names)
    };
    let before = sockets()?;
    let mut s3 = atlas_testbed::start_s3()?;
    // Its sockets are where it put them, in the /tmp it sees.
    let pid = s3.processes.pid("weed").context("no weed process")?;
    let own_tmp = format!("/proc/{pid}/root/tmp");
    let private = std::fs::read_dir(&own_tmp)
        .with_context(|| format!("read {own_tmp}"))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("seaweedfs-s3-grpc-"))
        .count();
    ensure!(private == 1, "SeaweedFS's own /tmp has {private} S3 gRPC sockets: the check below proves nothing");
    s3.kill();
    s3.restart()?;
    s3.kill();
    drop(s3);
    let after = sockets()?;
    let left: Vec<&String> = after.iter().filter(|n| !before.contains(n)).collect();
    ensure!(left.is_empty(), "a killed SeaweedFS left sockets in /tmp: {left:?}");
    Ok(())
}

fn reqwest_client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder().no_proxy().build()?)
}
