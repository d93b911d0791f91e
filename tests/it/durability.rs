//! The order of a file:// push's durability operations, read from `strace`: a kill -9
//! keeps the page cache, so only the order itself shows whether a power loss could leave
//! a partial object under its final name or a narinfo whose NAR or references are not
//! durable.
use crate::helpers::*;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

/// One traced system call: its name, its arguments (as strace prints them, with `-y` fd
/// paths), and the trace lines where it started and returned.
#[derive(Debug)]
struct Call {
    name: String,
    args: String,
    start: usize,
    end: usize,
    ok: bool,
}

impl Call {
    /// The path of the call's first argument when it is a file descriptor (`7</a/b>`).
    fn fd_path(&self) -> Option<&str> {
        let first = self.args.split(", ").next()?;
        let open = first.find('<')?;
        first[open + 1..].strip_suffix('>')
    }

    /// The first two quoted strings: a rename's source and destination.
    fn rename_paths(&self) -> Option<(&str, &str)> {
        let mut quoted = self.args.split('"').skip(1).step_by(2);
        Some((quoted.next()?, quoted.next()?))
    }

    fn is_rename(&self) -> bool {
        matches!(self.name.as_str(), "rename" | "renameat" | "renameat2") && self.ok
    }
}

/// Parses `strace -f -o` output, joining `<unfinished ...>` and `<... resumed>` halves.
fn parse_trace(text: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut open: HashMap<&str, (String, String, usize)> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("<... ") {
            let Some((name, tail)) = r.split_once(" resumed>") else {
                continue;
            };
            if let Some((n, args, start)) = open.remove(pid) {
                assert_eq!(n, name, "{line}");
                calls.push(Call {
                    name: n,
                    args,
                    start,
                    end: i,
                    ok: !tail.contains("= -1"),
                });
            }
        } else if let Some((call, _)) = rest.split_once(" <unfinished ...>") {
            if let Some((name, args)) = call.split_once('(') {
                open.insert(pid, (name.to_owned(), args.to_owned(), i));
            }
        } else if let Some((name, args)) = rest.split_once('(') {
            if name.starts_with("---") || name.starts_with("+++") {
                continue;
            }
            let (args, ret) = args.rsplit_once(") = ").unwrap_or((args, ""));
            calls.push(Call {
                name: name.to_owned(),
                args: args.to_owned(),
                start: i,
                end: i,
                ok: !ret.starts_with("-1"),
            });
        }
    }
    calls
}

/// A sync that started after `after` and returned before `before`, and covers `path`:
/// an fsync or fdatasync of `path` itself, or a syncfs (the cache is on one file system).
fn synced_between(calls: &[Call], path: &str, after: usize, before: usize) -> bool {
    calls.iter().any(|c| {
        c.ok && c.start > after
            && c.end < before
            && match c.name.as_str() {
                "syncfs" => true,
                "fsync" | "fdatasync" => c.fd_path() == Some(path),
                _ => false,
            }
    })
}

/// Runs `narflow push --to file://<cache> --key-file <key> <paths>` under `strace -f -y`,
/// tracing `syscalls`; returns the traced calls.
fn traced_push(
    cache: &Path,
    trace: &Path,
    syscalls: &str,
    key: &NixKey,
    paths: &[&str],
) -> Vec<Call> {
    if Command::new("strace").arg("-V").output().is_err() {
        panic!("strace is missing (apt-get install -y strace; scripts/test installs it)");
    }
    let out = Command::new("strace")
        .args(["-f", "-y", "-qq", "-o"])
        .arg(trace)
        .args(["-e", &format!("trace={syscalls}")])
        .arg(env!("CARGO_BIN_EXE_narflow"))
        .args(["push", "--to", &format!("file://{}", cache.display())])
        .arg("--key-file")
        .arg(&key.secret)
        .args(paths)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_trace(&std::fs::read_to_string(trace).unwrap())
}

#[test]
fn every_object_is_synced_before_its_name_and_every_narinfo_after_its_nar_and_references() {
    let top = nix_build_chain("durability", 6);
    let closure = nix_closure(&top);
    let big = BigPath::new("durability-big", 20 << 20);
    let tmp = tempdir();
    let root = tmp.path().canonicalize().unwrap();
    let cache = root.join("cache");
    let key = nix_generate_key("narflow-durability-1");
    let calls = traced_push(
        &cache,
        &root.join("trace"),
        "write,writev,pwrite64,fsync,fdatasync,syncfs,rename,renameat,renameat2",
        &key,
        &[&top, &big.path],
    );
    let cache_s = cache.display().to_string();
    let renames: Vec<&Call> = calls
        .iter()
        .filter(|c| c.is_rename())
        .filter(|c| {
            c.rename_paths()
                .is_some_and(|(_, d)| d.starts_with(&cache_s))
        })
        .collect();

    // 1. Every object's bytes are synced after its last write and before its rename.
    for r in &renames {
        let (src, dst) = r.rename_paths().unwrap();
        let last_write = calls
            .iter()
            .filter(|c| c.name.contains("write") && c.fd_path() == Some(src))
            .map(|c| c.end)
            .max()
            .unwrap_or_else(|| panic!("no write to {src} (renamed to {dst}) in the trace"));
        assert!(
            synced_between(&calls, src, last_write, r.start),
            "{dst}: renamed (trace line {}) without a sync of its bytes since its last write \
             (line {last_write})",
            r.start + 1
        );
    }

    // 2. Every narinfo is renamed after a sync that follows its NAR's rename and every
    //    reference's narinfo rename.
    let renamed_to = |dst: &Path| -> Option<&Call> {
        let dst = dst.display().to_string();
        renames
            .iter()
            .copied()
            .filter(|c| c.rename_paths().unwrap().1 == dst)
            .min_by_key(|c| c.start)
    };
    let mut narinfos = 0;
    for path in closure.iter().chain([&big.path]) {
        let file = cache.join(narinfo_key(path));
        let r = renamed_to(&file).unwrap_or_else(|| panic!("{}: never renamed", file.display()));
        narinfos += 1;
        let text = std::fs::read_to_string(&file).unwrap();
        let url = narinfo_field(&text, "URL").unwrap();
        let nar = renamed_to(&cache.join(url)).unwrap_or_else(|| panic!("{url}: never renamed"));
        assert!(nar.end < r.start, "{path}: narinfo renamed before its NAR");
        assert!(
            synced_between(
                &calls,
                &cache.join("nar").display().to_string(),
                nar.end,
                r.start
            ),
            "{path}: narinfo renamed (line {}) before its NAR's rename (line {}) was synced",
            r.start + 1,
            nar.end + 1
        );
        let refs = narinfo_field(&text, "References").unwrap_or_default();
        for reference in refs.split_whitespace().filter(|b| !path.ends_with(*b)) {
            let ref_file = cache.join(format!("{}.narinfo", &reference[..32]));
            let rr = renamed_to(&ref_file).unwrap_or_else(|| panic!("{reference}: never renamed"));
            assert!(
                synced_between(&calls, &cache_s, rr.end, r.start),
                "{path}: narinfo renamed (line {}) before its reference {reference}'s \
                 (line {}) was synced",
                r.start + 1,
                rr.end + 1
            );
        }
    }
    assert_eq!(narinfos, closure.len() + 1);
    let syncs = calls
        .iter()
        .filter(|c| matches!(c.name.as_str(), "syncfs" | "fsync" | "fdatasync"))
        .count();
    println!("{} renames, {syncs} syncs", renames.len());
}

/// A large NAR's file is written back as it is written, and never more than two steps of
/// it are dirty or being written: each step's writeback is started, and the step before
/// it waited for, before more goes in. An `fdatasync` of a small path published meanwhile
/// (which on ext4 commits the journal, writing every dirty file of the transaction first)
/// then finds little to wait for; with writeback only started, a large NAR's whole dirty
/// tail could stand between a small path and its narinfo.
#[test]
fn a_large_nar_is_written_back_at_most_two_steps_ahead_of_the_disk() {
    let big = BigPath::new("writeback-big", 48 << 20);
    let tmp = tempdir();
    let root = tmp.path().canonicalize().unwrap();
    let cache = root.join("cache");
    let key = nix_generate_key("narflow-writeback-1");
    let calls = traced_push(
        &cache,
        &root.join("trace"),
        "sync_file_range",
        &key,
        &[&big.path],
    );
    // (offset, waits) of each call on the NAR's temporary file, in order.
    let nar_dir = cache.join("nar").display().to_string();
    let ranges: Vec<(u64, bool)> = calls
        .iter()
        .filter(|c| c.ok && c.name == "sync_file_range")
        .filter(|c| c.fd_path().is_some_and(|p| p.starts_with(&nar_dir)))
        .map(|c| {
            let offset = c.args.split(", ").nth(1).unwrap().parse().unwrap();
            (offset, c.args.contains("SYNC_FILE_RANGE_WAIT_AFTER"))
        })
        .collect();
    let started: Vec<u64> = ranges.iter().filter(|r| !r.1).map(|r| r.0).collect();
    assert!(
        started.len() >= 4,
        "a 48 MiB NAR is written back in steps as it is written: {ranges:?}"
    );
    // After the k-th step is started, step k-1 is waited for before step k+1 starts.
    for (k, pair) in started.windows(2).enumerate() {
        let at = ranges.iter().position(|r| *r == (pair[1], false)).unwrap();
        let next = ranges[at + 1..]
            .iter()
            .position(|r| !r.1)
            .map_or(ranges.len(), |p| at + 1 + p);
        assert!(
            ranges[at..next].contains(&(pair[0], true)),
            "step {k} (offset {}) was not waited for after step {} started: {ranges:?}",
            pair[0],
            k + 1
        );
    }
}
