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
    // worktree neither lives under `.git/`: ask git where they are. The refs are watched
    // as a directory (cargo scans it recursively): a branch's own file, or the directory
    // of a branch named with slashes, exists only while its ref is not packed. Only paths
    // that exist are watched: cargo reruns the script on every build for a missing one.
    for name in ["HEAD", "packed-refs", "refs/heads"] {
        if let Some(path) = git(&["rev-parse", "--git-path", name]) {
            if Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    let revision = std::env::var("GIT_REVISION")
        .ok()
        .filter(|r| !r.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FIBONACCI_API_REVISION={revision}");
}
