//! `atlas-testbed run [--no-cluster] [--no-s3] [--nodes [--image-binary PATH]] -- CMD ARGS...`: starts
//! the test bed once, runs CMD with the bed's addresses in `ATLAS_TEST_*`, stops the bed and exits
//! with CMD's status. `--nodes` also starts a cluster with a node that runs pods (our image built from
//! the Dockerfile around the image binary, `target/release/atlas-runner` unless given), beside the
//! bare API server tests that need no node keep using, and a second S3 on the node bed's host
//! address, where pods reach it (`ATLAS_TEST_S3_POD_*`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use atlas_testbed::node::{NodeOptions, start_node_cluster};
use atlas_testbed::{ClusterProcesses, S3Processes, env, start_cluster, start_s3, start_s3_on};
use tokio::signal::unix::{SignalKind, signal};

const USAGE: &str =
    "usage: atlas-testbed run [--no-cluster] [--no-s3] [--nodes [--image-binary PATH] [--volumes N]] -- CMD [ARGS...]";

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("atlas-testbed: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run() -> Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(("run", rest)) = args.split_first().map(|(a, r)| (a.as_str(), r)) else {
        bail!("{USAGE}");
    };
    let split = rest.iter().position(|a| a == "--").context("usage: put the command after `--`")?;
    let (flags, command) = (&rest[..split], &rest[split + 1..]);
    let (program, command_args) = command.split_first().context("no command given after `--`")?;
    let (mut want_cluster, mut want_s3, mut nodes) = (true, true, false);
    let mut image_binary = PathBuf::from("target/release/atlas-runner");
    let mut volumes = 16;
    let mut flags = flags.iter();
    while let Some(flag) = flags.next() {
        match flag.as_str() {
            "--no-cluster" => want_cluster = false,
            "--no-s3" => want_s3 = false,
            "--nodes" => nodes = true,
            "--image-binary" => image_binary = flags.next().context("--image-binary needs a path")?.into(),
            "--volumes" => volumes = flags.next().context("--volumes needs a number")?.parse().context("--volumes")?,
            other => bail!("unknown flag {other}; {USAGE}"),
        }
    }
    if nodes && !image_binary.is_file() {
        bail!(
            "--nodes: the image binary {} does not exist: build it first (cargo build --release --bin atlas-runner) or pass --image-binary",
            image_binary.display()
        );
    }

    let started = std::time::Instant::now();
    // The bare API server (what tests that need no node use), S3 on loopback and the node cluster
    // start side by side; pods get an S3 of their own on the node bed's host address.
    let cluster = tokio::task::spawn_blocking(move || want_cluster.then(start_cluster).transpose());
    let s3 = tokio::task::spawn_blocking(move || want_s3.then(start_s3).transpose());
    let image_binary = std::path::absolute(&image_binary).context("the image binary's path")?;
    let (node_cluster, pod_s3) = if nodes {
        let options = NodeOptions { image_binary: image_binary.clone(), volumes };
        let node_cluster = tokio::task::spawn_blocking(move || start_node_cluster(&options)).await??;
        let host_ip = node_cluster.network.host_ip;
        let pod_s3 =
            tokio::task::spawn_blocking(move || want_s3.then(|| start_s3_on(host_ip, None)).transpose()).await??;
        if let Some(s3) = &pod_s3 {
            node_cluster.network.open_to_pods(s3.s3_port())?;
        }
        eprintln!("atlas-testbed: node bed {} in {}", node_cluster.network.name, node_cluster.network.dir.display());
        eprintln!("atlas-testbed: node Ready {:.1}s after start", node_cluster.started_in.as_secs_f64());
        (Some(node_cluster), pod_s3)
    } else {
        (None, None)
    };
    let cluster: Option<ClusterProcesses> = cluster.await??;
    let s3: Option<S3Processes> = s3.await??;
    eprintln!("atlas-testbed: bed ready in {:.1}s", started.elapsed().as_secs_f64());

    let mut cmd = tokio::process::Command::new(program);
    cmd.args(command_args).env(env::BIN, atlas_testbed::bin_dir());
    if let Some(c) = &cluster {
        cmd.env(env::KUBECONFIG, &c.kubeconfig);
    }
    if let Some(c) = &node_cluster {
        cmd.env(env::NODE_KUBECONFIG, c.kubeconfig())
            .env(env::IMAGE, &c.image.name)
            .env(env::IMAGE_CONFIG, &c.image.config)
            .env(env::IMAGE_BINARY, &image_binary)
            .env(env::NODE_NETNS, c.network.netns_path())
            .env(env::NODE_BED, &c.network.name)
            .env(env::NODE_HOSTS, c.network.node_dir().join(atlas_testbed::node::HOSTS_FILE))
            .env(env::NODE_CONTAINERD, c.network.node_dir().join(atlas_testbed::node::CONTAINERD_SOCKET));
    }
    if let Some(s) = &s3 {
        cmd.env(env::S3_ENDPOINT, &s.endpoint.endpoint)
            .env(env::S3_ACCESS_KEY, &s.endpoint.access_key)
            .env(env::S3_SECRET_KEY, &s.endpoint.secret_key);
    }
    if let Some(s) = &pod_s3 {
        cmd.env(env::S3_POD_ENDPOINT, &s.endpoint.endpoint)
            .env(env::S3_POD_ACCESS_KEY, &s.endpoint.access_key)
            .env(env::S3_POD_SECRET_KEY, &s.endpoint.secret_key);
    }
    let mut child = cmd.spawn().with_context(|| format!("start {program}"))?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let status = tokio::select! {
        status = child.wait() => Some(status?),
        _ = term.recv() => None,
        _ = int.recv() => None,
    };
    if status.is_none() {
        let _ = child.kill().await;
    }
    // Dropping the beds stops their processes and removes what they added.
    drop(pod_s3);
    drop(s3);
    drop(node_cluster);
    drop(cluster);
    Ok(match status.and_then(|s| s.code()) {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::from(130),
    })
}
