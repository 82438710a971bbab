//! Starts the built `tandem serve` on a real model and drives it with the official `openai`
//! Python client and raw HTTP (tests/server/test_server.py), then stops it with SIGTERM.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn smollm2() -> PathBuf {
    tandem_testkit::smollm2()
}

/// A port free now and never handed out before in this process: the tests here run in parallel,
/// and two once got the same port from the OS between its release and a server's bind.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn start(model: &Path, port: u16) -> Server {
    start_with(model, port, &[])
}

fn start_with(model: &Path, port: u16, extra: &[&str]) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["serve", "--port", &port.to_string(), "--max-batch", "8", "--shutdown-grace", "20", "--model"])
        .arg(model)
        .args(extra)
        .spawn()
        .unwrap();
    let mut server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(120);
    while get(port, "/health").is_none_or(|r| !r.starts_with("HTTP/1.1 200")) {
        assert!(Instant::now() < deadline, "the server did not come up");
        // Not another process's answer on this port: ours must still be running.
        assert!(server.0.try_wait().unwrap().is_none(), "the server exited while starting (output above)");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(server.0.try_wait().unwrap().is_none(), "the server exited while starting (output above)");
    server
}

/// Stops `server` with SIGTERM, as an operator would, and checks that it exits cleanly (a
/// graceful shutdown: what runs finishes, the online trainer writes its checkpoint).
fn terminate(server: &mut Server) {
    let pid = server.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(code) = server.0.try_wait().unwrap() {
            assert!(code.success(), "exit status after SIGTERM: {code}");
            return;
        }
        assert!(Instant::now() < deadline, "the server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn openai_client_and_raw_http_against_tandem_serve() {
    let port = free_port();
    let mut server = start(&smollm2(), port);
    let status = tandem_testkit::python_script("tests/server/test_server.py")
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("SmolLM2-135M-Instruct.Q4_1")
        .status()
        .unwrap();
    assert!(status.success(), "tests/server/test_server.py failed (output above)");

    // SIGTERM: the server stops accepting, finishes what runs, and exits cleanly.
    terminate(&mut server);
}

#[test]
fn speculative_server_answers_exactly_what_a_plain_server_answers() {
    let (plain_port, spec_port) = (free_port(), free_port());
    let _plain = start(&smollm2(), plain_port);
    let _spec = start_with(&smollm2(), spec_port, &["--spec", "ngram", "--spec-k", "4"]);
    let status = tandem_testkit::python_script("tests/server/test_spec.py")
        .arg(format!("http://127.0.0.1:{plain_port}"))
        .arg(format!("http://127.0.0.1:{spec_port}"))
        .arg("SmolLM2-135M-Instruct.Q4_1")
        .status()
        .unwrap();
    assert!(status.success(), "tests/server/test_spec.py failed (output above)");
}

#[test]
fn online_training_server_answers_exactly_what_a_plain_server_answers() {
    let (plain_port, online_port) = (free_port(), free_port());
    let save = std::env::temp_dir().join(format!("tandem-online-drafter-{}", std::process::id()));
    let traces = std::env::temp_dir().join(format!("tandem-online-traces-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&save);
    let _ = std::fs::remove_dir_all(&traces);
    let _plain = start(&smollm2(), plain_port);
    let mut online = start_with(
        &smollm2(),
        online_port,
        &[
            "--spec",
            "eagle",
            "--spec-train",
            "online",
            "--publish-every",
            "1",
            "--train-cpu-share",
            "1.0",
            "--train-min-share",
            "1.0",
            "--train-batch",
            "32",
            "--drafter-save",
            save.to_str().unwrap(),
            "--trace-dir",
            traces.to_str().unwrap(),
        ],
    );
    let status = tandem_testkit::python_script("tests/server/test_online.py")
        .arg(format!("http://127.0.0.1:{plain_port}"))
        .arg(format!("http://127.0.0.1:{online_port}"))
        .arg("SmolLM2-135M-Instruct.Q4_1")
        .status()
        .unwrap();
    assert!(status.success(), "tests/server/test_online.py failed (output above)");
    // Shutdown writes the drafter checkpoint, which a new server can start from.
    terminate(&mut online);
    assert!(save.join("config.json").exists() && save.join("model.safetensors").exists(), "no checkpoint at shutdown");
    let port = free_port();
    let _again = start_with(&smollm2(), port, &["--spec", &format!("eagle:{}", save.display())]);
    assert!(get(port, "/health").is_some_and(|r| r.starts_with("HTTP/1.1 200")));
    // The recorded traces train a drafter offline with the same trainer, reporting agreement on
    // the traces it held out.
    let offline = std::env::temp_dir().join(format!("tandem-offline-drafter-{}", std::process::id()));
    let train_drafter = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["train-drafter", "--report-every", "2", "--holdout", "2", "--train-batch", "32", "--model"])
            .arg(smollm2())
            .arg("--traces")
            .arg(&traces)
            .arg("--out")
            .arg(&offline)
            .args(args)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "train-drafter {args:?} failed:\n{log}");
        log
    };
    let log = train_drafter(&["--steps", "4", "--replay-positions", "100"]);
    assert!(log.contains("step 4: loss") && log.contains("held-out top-1 agreement"), "{log}");
    assert!(offline.join("model.safetensors").exists());
    // Beside it, a sample of what it trained on: online training from it replays that, and the
    // online checkpoint keeps a copy (a server continuing from the checkpoint replays it too).
    assert!(log.contains("replay set: ") && log.contains("positions) in"), "{log}");
    let replayed = std::fs::read_dir(offline.join("replay")).unwrap().count();
    assert!(replayed >= 1, "{log}");
    let resave = std::env::temp_dir().join(format!("tandem-online-resave-{}", std::process::id()));
    let port = free_port();
    let spec = format!("eagle:{}", offline.display());
    let args = ["--spec", &spec, "--spec-train", "online", "--drafter-save", resave.to_str().unwrap()];
    terminate(&mut start_with(&smollm2(), port, &args));
    assert_eq!(std::fs::read_dir(resave.join("replay")).unwrap().count(), replayed);
    // Text the target reads trains it too (here besides the traces): at most four chunks a file.
    let corpus = std::env::temp_dir().join(format!("tandem-corpus-{}", std::process::id()));
    std::fs::create_dir_all(corpus.join("pkg")).unwrap();
    std::fs::write(corpus.join("pkg/ops.py"), "def add(a, b):\n    return a + b\n\n".repeat(80)).unwrap();
    std::fs::write(corpus.join("pkg/skipped.bin"), "not text").unwrap();
    let corpus_arg = corpus.to_str().unwrap();
    let log =
        train_drafter(&["--steps", "2", "--corpus-tokens", "100000", "--corpus-chunk", "128", "--corpus", corpus_arg]);
    assert!(log.contains("corpus: 4 chunks, 512 positions") && log.contains("step 2: loss"), "{log}");
    for d in [&save, &traces, &offline, &corpus, &resave] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn tinker_sdk_trains_and_samples_against_tandem_serve() {
    let dir = std::env::temp_dir().join(format!("tandem-training-api-{}", std::process::id()));
    let tiny = tandem_testkit::tiny_dir();
    tandem_testkit::require_python(&["tinker"]);
    let port = free_port();
    let ckpt = dir.join("training");
    let exports = dir.join("exports");
    let _server = start_with(
        &tiny.join("qwen2-tied-bias"),
        port,
        &["--training-dir", ckpt.to_str().unwrap(), "--export-dir", exports.to_str().unwrap()],
    );
    let vocab: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny.join("qwen2-tied-bias/config.json")).unwrap()).unwrap();
    let status = tandem_testkit::python_script("tests/server/test_training.py")
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("qwen2-tied-bias")
        .arg(vocab["vocab_size"].to_string())
        .arg(&exports)
        .status()
        .unwrap();
    assert!(status.success(), "tests/server/test_training.py failed (output above)");
    // The same tiny model under small training limits.
    let limited_port = free_port();
    let limited_dir = dir.join("limited");
    let _limited = start_with(
        &tiny.join("qwen2-tied-bias"),
        limited_port,
        &[
            "--training-dir",
            limited_dir.to_str().unwrap(),
            "--max-session-models",
            "1",
            "--max-pending-requests",
            "2",
            "--max-samplers",
            "2",
            "--training-disk",
            "2000",
            "--session-timeout",
            "3",
        ],
    );
    let status = tandem_testkit::python_script("tests/server/test_limits.py")
        .arg(format!("http://127.0.0.1:{limited_port}"))
        .arg("qwen2-tied-bias")
        .status()
        .unwrap();
    assert!(status.success(), "tests/server/test_limits.py failed (output above)");
    let status = tandem_testkit::python_script("tests/server/test_xorl.py")
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("qwen2-tied-bias")
        .status()
        .unwrap();
    assert!(status.success(), "tests/server/test_xorl.py failed (output above)");
    // The merged export of trained weights is a checkpoint tandem serves.
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["generate", "--max-tokens", "4", "--prompt", "hello", "--model"])
        .arg(exports.join("merged"))
        .output()
        .unwrap();
    assert!(out.status.success(), "generate on the merged export failed: {}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn api_keys_guard_every_route_and_slow_or_idle_clients_are_cut_off() {
    let port = free_port();
    let (serve, train, admin) = ("sk-serve-0123456789", "sk-train-0123456789", "sk-admin-0123456789");
    let args = [
        "--api-key",
        serve,
        "--training-api-key",
        train,
        "--admin-api-key",
        admin,
        "--idle-timeout",
        "2",
        "--request-timeout",
        "2",
    ];
    let _server = start_with(&smollm2(), port, &args);
    let status = tandem_testkit::python_script("tests/server/test_auth.py")
        .arg(format!("http://127.0.0.1:{port}"))
        .args(["SmolLM2-135M-Instruct.Q4_1", serve, train, admin, "2", "2"])
        .status()
        .unwrap();
    assert!(status.success(), "tests/server/test_auth.py failed (output above)");
}

#[test]
fn reliability_suite_bad_input_disconnects_training_while_serving_and_memory() {
    let port = free_port();
    let budget: u64 = 4 << 30;
    // A 512-token context keeps the maximal training datum short enough for CI; the KV pool
    // (8 sequences x 512 tokens x 45 KiB of KV per token) is the size that used to set it.
    let args = ["--kv-budget", "180MiB", "--max-seq-len", "512", "--training-memory", "4GiB"];
    let server = start_with(&smollm2(), port, &args);
    let status = tandem_testkit::python_script("tests/server/test_reliability.py")
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("SmolLM2-135M-Instruct.Q4_1")
        .arg(server.0.id().to_string())
        .arg(budget.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "tests/server/test_reliability.py failed (output above)");
}

/// `tandem convert care` through the command line (2x smaller: at 4x, unhealed, some prompts'
/// first greedy token is the end), then the converted SmolLM2 served twice,
/// plain and with n-gram speculation: the same answers (tests/server/test_spec.py), with a KV
/// cache the size the conversion promises.
#[test]
fn a_care_converted_model_serves_speculation_unchanged() {
    let out = std::env::temp_dir().join(format!("tandem-care-serve-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["convert", "care", "--kv-ratio", "2"])
        .arg("--model")
        .arg(smollm2())
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "tandem convert care failed");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["latent_kv"]["k_ranks"].as_array().unwrap().len(), 30);
    let element = tandem_models::KvDtype::default().bytes();
    assert_eq!(config["tandem_conversion"]["kv_bytes_per_token"]["converted"], 30 * 2 * 96 * element);
    assert_eq!(config["tandem_conversion"]["allocation"], "uniform", "the default allocation");
    let (plain_port, spec_port) = (free_port(), free_port());
    let _plain = start(&out, plain_port);
    let _spec = start_with(&out, spec_port, &["--spec", "ngram", "--spec-k", "4"]);
    let name = out.file_name().unwrap().to_string_lossy().to_string();
    let status = tandem_testkit::python_script("tests/server/test_spec.py")
        .arg(format!("http://127.0.0.1:{plain_port}"))
        .arg(format!("http://127.0.0.1:{spec_port}"))
        .arg(&name)
        .status()
        .unwrap();
    assert!(status.success(), "tests/server/test_spec.py failed on the converted model (output above)");
    let metrics = get(plain_port, "/metrics").unwrap();
    assert!(metrics.contains("tandem_kv_cache"), "no KV metrics");
    let _ = std::fs::remove_dir_all(&out);
}

/// Two models in one server (SmolLM2 under two names: two engines, two KV pools), the scoring
/// call, and evolving models over them (tests/server/test_evolve.py); then configurations that
/// must stop the server at startup with a clear message.
#[test]
fn two_models_scoring_and_evolving_models_in_one_server() {
    let dir = std::env::temp_dir().join(format!("tandem-evolve-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let b = dir.join("smol-b.gguf");
    let _ = std::fs::remove_file(&b);
    std::os::unix::fs::symlink(smollm2(), &b).unwrap();
    let a_name = "SmolLM2-135M-Instruct.Q4_1";
    let config = |name: &str, json: String| {
        let p = dir.join(format!("{name}.json"));
        std::fs::write(&p, json).unwrap();
        format!("{name}={}", p.display())
    };
    let evolver = config(
        "evolver",
        format!(r#"{{"n": 4, "k": 2, "t": 2, "tiers": ["{a_name}", "smol-b"], "percentile": 50, "max_tokens": 48}}"#),
    );
    let slow =
        config("slow-evolver", format!(r#"{{"n": 32, "k": 2, "t": 3, "tiers": ["{a_name}"], "max_tokens": 200}}"#));
    let port = free_port();
    let b_arg = b.to_string_lossy().to_string();
    let _server = start_with(&smollm2(), port, &["--model", &b_arg, "--evolve", &evolver, "--evolve", &slow]);
    let status = tandem_testkit::python_script("tests/server/test_evolve.py")
        .arg(format!("http://127.0.0.1:{port}"))
        .args([a_name, "smol-b"])
        .status()
        .unwrap();
    assert!(status.success(), "tests/server/test_evolve.py failed (output above)");

    let refused = |json: &str, extra: &[&str]| {
        let bad = config("bad", json.to_string());
        let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["serve", "--port", &free_port().to_string(), "--model"])
            .arg(smollm2())
            .args(extra)
            .args(["--evolve", &bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "a bad configuration must stop the server");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = refused(r#"{"n": 4}"#, &[]);
    assert!(e.contains("--evolve bad") && e.contains("missing field `tiers`"), "{e}");
    let e = refused(r#"{"tiers": ["nope"]}"#, &[]);
    assert!(e.contains("model `nope` is not served"), "{e}");
    let e = refused(&format!(r#"{{"tiers": ["{a_name}"], "k": 8, "max_tokens": 4000}}"#), &["--max-seq-len", "8192"]);
    assert!(e.contains("lower k or max_tokens"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
