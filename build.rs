//! Stamps the build with its source revision for the `build_info` metric: the
//! `GIT_REVISION` variable when set (container builds have no .git), else git's answer.

use std::{path::Path, process::Command};

/// Git's answer to `args`, trimmed; None when git is missing or fails.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=GIT_REVISION");
    // A commit moves the branch's ref, not HEAD (which names the branch), and in a
    // worktree neither lives under `.git/`: ask git where they are. The ref is watched
    // through its directory, as a freshly cloned branch has no file of its own until its
    // first commit (its ref is in packed-refs). Only paths that exist are watched: cargo
    // reruns the script on every build for a missing one.
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    watched.push(git(&["rev-parse", "--git-path", "packed-refs"]));
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        let path = git(&["rev-parse", "--git-path", &branch]);
        watched.push(path.and_then(|p| Some(Path::new(&p).parent()?.display().to_string())));
    }
    for path in watched.into_iter().flatten() {
        if Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let revision = std::env::var("GIT_REVISION")
        .ok()
        .filter(|r| !r.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FIBONACCI_API_REVISION={revision}");
}
