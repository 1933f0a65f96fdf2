//! `atlas-testbed run [--no-cluster] [--no-s3] -- CMD ARGS...`: starts the test bed once, runs CMD with
//! the bed's addresses in `ATLAS_TEST_*`, stops the bed and exits with CMD's status.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use atlas_testbed::{ClusterProcesses, S3Processes, env, start_cluster, start_s3};
use tokio::signal::unix::{SignalKind, signal};

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
        bail!("usage: atlas-testbed run [--no-cluster] [--no-s3] -- CMD [ARGS...]");
    };
    let split = rest.iter().position(|a| a == "--").context("usage: put the command after `--`")?;
    let (flags, command) = (&rest[..split], &rest[split + 1..]);
    let (program, command_args) = command.split_first().context("no command given after `--`")?;
    let want_cluster = !flags.iter().any(|f| f == "--no-cluster");
    let want_s3 = !flags.iter().any(|f| f == "--no-s3");

    let started = std::time::Instant::now();
    // Start both parts side by side; each is a blocking start-and-poll.
    let cluster = tokio::task::spawn_blocking(move || want_cluster.then(start_cluster).transpose());
    let s3 = tokio::task::spawn_blocking(move || want_s3.then(start_s3).transpose());
    let cluster: Option<ClusterProcesses> = cluster.await??;
    let s3: Option<S3Processes> = s3.await??;
    eprintln!("atlas-testbed: bed ready in {:.1}s", started.elapsed().as_secs_f64());

    let mut cmd = tokio::process::Command::new(program);
    cmd.args(command_args).env(env::BIN, atlas_testbed::bin_dir());
    if let Some(c) = &cluster {
        cmd.env(env::KUBECONFIG, &c.kubeconfig);
    }
    if let Some(s) = &s3 {
        cmd.env(env::S3_ENDPOINT, &s.endpoint.endpoint)
            .env(env::S3_ACCESS_KEY, &s.endpoint.access_key)
            .env(env::S3_SECRET_KEY, &s.endpoint.secret_key);
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
    // Dropping the beds stops their process groups and removes their directories.
    drop(cluster);
    drop(s3);
    Ok(match status.and_then(|s| s.code()) {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::from(130),
    })
}
