//! `--model org/name` against a stand-in Hugging Face hub on loopback (no real hub is reachable
//! here): the files land in the hub cache `HF_HOME` names, load from it with `HF_HUB_OFFLINE=1`
//! once the hub is gone, and a repository that does not exist is a clear error.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

/// Serves `GET /{org}/{name}/resolve/{revision}/{file}` from `repos/{org}/{name}/{file}` the way
/// the hub does for hf-hub: `Range` requests answered with 206 and `Content-Range`, an `ETag` and
/// an `X-Repo-Commit` on every file, 404 for anything else. Returns the endpoint and a count of
/// requests served.
fn stand_in_hub(repos: PathBuf) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut range = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = v.trim().split_once('-').unwrap();
                    range = Some((a.parse::<u64>().unwrap(), b.parse::<u64>().ok()));
                }
            }
            count.fetch_add(1, Ordering::SeqCst);
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
            let file = match parts.as_slice() {
                [org, name, "resolve", _rev, file] => repos.join(org).join(name).join(file),
                _ => PathBuf::new(),
            };
            let Ok(mut body) = std::fs::read(&file) else {
                let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                continue;
            };
            let size = body.len() as u64;
            let etag = format!(
                "{:x}",
                body.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
            );
            let (status, first, last) = match range {
                Some((a, b)) => ("206 Partial Content", a, b.unwrap_or(size - 1).min(size - 1)),
                None => ("200 OK", 0, size - 1),
            };
            body = body[first as usize..=last as usize].to_vec();
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {first}-{last}/{size}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {}\r\nConnection: close\r\n\r\n",
                body.len(),
                "0123456789abcdef0123456789abcdef01234567"
            );
            let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(&body));
            let _ = reader.read(&mut [0u8; 0]);
        }
    });
    (endpoint, served)
}

fn generate(model: &str, hf_home: &Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = tandem();
    cmd.args(["generate", "--model", model, "--prompt", "the cat", "--max-tokens", "5"])
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_ENDPOINT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn models_come_from_the_hub_cache_and_load_offline() {
    let tiny = tandem_testkit::scratch_dir("hub");
    let repos = tiny.join("repos");
    // A folder checkpoint as org/name on the stand-in hub.
    let repo = repos.join("tiny-org").join("tiny-qwen2");
    std::fs::create_dir_all(&repo).unwrap();
    let local_dir = tandem_testkit::tiny("qwen2-tied-bias");
    for f in std::fs::read_dir(&local_dir).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), repo.join(f.file_name())).unwrap();
    }
    let (endpoint, served) = stand_in_hub(repos);
    let home = tiny.join("hf-home");

    // The local folder's output is what the hub's copy must give.
    let local = tandem()
        .args(["generate", "--model"])
        .arg(&local_dir)
        .args(["--prompt", "the cat", "--max-tokens", "5"])
        .output()
        .unwrap();
    assert!(local.status.success(), "{}", String::from_utf8_lossy(&local.stderr));

    let online = generate("tiny-org/tiny-qwen2", &home, &[("HF_ENDPOINT", &endpoint)]);
    assert!(online.status.success(), "{}", String::from_utf8_lossy(&online.stderr));
    assert_eq!(online.stdout, local.stdout);
    assert!(served.load(Ordering::SeqCst) > 0, "nothing was fetched from the stand-in hub");
    let snapshots = home.join("hub/models--tiny-org--tiny-qwen2/snapshots");
    assert!(snapshots.is_dir(), "the files are not in the hub cache layout");

    // The hub gone (an endpoint nothing listens on): the cache alone serves, offline.
    let before = served.load(Ordering::SeqCst);
    let offline =
        generate("tiny-org/tiny-qwen2", &home, &[("HF_HUB_OFFLINE", "1"), ("HF_ENDPOINT", "http://127.0.0.1:9")]);
    assert!(offline.status.success(), "{}", String::from_utf8_lossy(&offline.stderr));
    assert_eq!(offline.stdout, local.stdout);
    assert_eq!(served.load(Ordering::SeqCst), before, "offline mode reached the hub");

    // A repository that is neither cached nor on the hub: a precise error, offline and online.
    let missing = generate("tiny-org/nothing-here", &home, &[("HF_HUB_OFFLINE", "1")]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("tiny-org/nothing-here") && err.contains("HF_HUB_OFFLINE"), "{err}");
    let missing = generate("tiny-org/nothing-here", &home, &[("HF_ENDPOINT", &endpoint)]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("tiny-org/nothing-here/config.json") && err.contains("404"), "{err}");
}
