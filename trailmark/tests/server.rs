//! The HTTP server against hostile and sloppy clients: timeouts and the
//! connection limit, metric labels, body caps and encodings, JSON for every
//! error, what 5xx and `/readyz` reveal, the admin listener, trusted proxies,
//! the compressed SDK; and the binary's command line (help, errors, a data
//! directory in use). Embedded mode only: the server layer is the same code
//! in both modes.
//!
//! Timeouts are configured in hundreds of milliseconds so the suite stays
//! fast; every wait is bounded by a deadline a few times the timeout.

mod common;

/// One in-process server on the embedded backends.
const DISTRIBUTED: bool = false;

use std::time::{Duration, Instant};

use common::{TestServer, WRITE_KEY, basic, gzip, read};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A bound for anything a timeout of a few hundred ms should have done.
const PATIENCE: Duration = Duration::from_secs(5);

fn addr(s: &TestServer) -> String {
    s.base.trim_start_matches("http://").to_owned()
}

/// Reads until the peer closes (or errors). Returns what was read.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one response whose body ends with `end`.
async fn read_response(stream: &mut TcpStream, end: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        while !String::from_utf8_lossy(&out).ends_with(end) {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before the response ended: {out:?}");
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("a response in time");
    String::from_utf8(out).unwrap()
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dribbling_its_headers_is_closed_within_the_header_timeout() {
    let s = TestServer::start_with(|c| c.server.header_timeout_ms = 300).await;
    let mut stream = TcpStream::connect(addr(&s)).await.unwrap();
    let started = Instant::now();
    let head = b"POST /v1/track HTTP/1.1\r\nhost: t\r\nx-pad: "
        .iter()
        .chain(b"a".repeat(1000).iter())
        .copied()
        .collect::<Vec<_>>();
    let (mut rd, mut wr) = stream.split();
    let dribble = async {
        for b in head {
            if wr.write_all(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::future::pending::<()>().await;
    };
    let closed = async {
        let mut buf = [0u8; 256];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(PATIENCE, async {
        tokio::select! { _ = dribble => {}, _ = closed => {} }
    })
    .await
    .expect("the server closes a connection dribbling its headers");
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_dribbling_past_the_body_timeout_gets_408() {
    let s = TestServer::start_with(|c| c.server.body_timeout_ms = 300).await;
    let mut stream = TcpStream::connect(addr(&s)).await.unwrap();
    let head = format!(
        "POST /v1/track HTTP/1.1\r\nhost: t\r\nauthorization: {}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n",
        basic(WRITE_KEY)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (mut rd, mut wr) = stream.split();
    let dribble = async {
        loop {
            if wr.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::future::pending::<()>().await;
    };
    let response = async {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return String::from_utf8_lossy(&out).into_owned(),
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    let text = tokio::time::timeout(PATIENCE, async {
        tokio::select! { _ = dribble => unreachable!(), text = response => text }
    })
    .await
    .expect("an answer and a close within the body timeout");
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"timeout\""), "{text}");
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed() {
    let s = TestServer::start_with(|c| c.server.idle_timeout_ms = 300).await;
    let mut stream = TcpStream::connect(addr(&s)).await.unwrap();
    stream.write_all(HEALTHZ).await.unwrap();
    let resp = read_response(&mut stream, "}").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let answered = Instant::now();
    let rest = tokio::time::timeout(PATIENCE, read_to_close(&mut stream))
        .await
        .expect("the idle connection is closed");
    assert!(rest.is_empty());
    assert!(answered.elapsed() >= Duration::from_millis(250));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_wait_for_a_free_slot() {
    let s = TestServer::start_with(|c| c.server.max_connections = 2).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr(&s)).await.unwrap();
        c.write_all(HEALTHZ).await.unwrap();
        read_response(&mut c, "}").await;
        held.push(c);
    }
    let mut third = TcpStream::connect(addr(&s)).await.unwrap();
    third.write_all(HEALTHZ).await.unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(400), third.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "a third connection was served over the limit of 2"
    );
    drop(held.pop());
    let resp = read_response(&mut third, "}").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_methods_do_not_grow_the_metrics() {
    let s = TestServer::start().await;
    for i in 0..50 {
        let method = reqwest::Method::from_bytes(format!("XM{i}").as_bytes()).unwrap();
        let r = s
            .client
            .request(method, s.url("/v1/track"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405);
    }
    let text = s
        .client
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !text.contains("XM"),
        "a client-chosen method became a label"
    );
    assert!(text.contains("method=\"other\""));
    // Unknown routes share one label too.
    s.client
        .get(s.url("/no/such/route/42"))
        .send()
        .await
        .unwrap();
    let text = s
        .client
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("/no/such"));
    assert!(text.contains("route=\"unmatched\""));
}

/// A gzip stream of `blocks` empty stored deflate blocks: large as sent,
/// empty once inflated.
fn empty_blocks_gzip(blocks: usize) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    for _ in 0..blocks {
        out.extend_from_slice(&[0x00, 0x00, 0x00, 0xff, 0xff]);
    }
    out.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    out.extend_from_slice(&[0; 8]); // crc32 and size of nothing
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_body_is_capped_as_sent() {
    let s = TestServer::start().await;
    let body = empty_blocks_gzip(400_000); // 2 MB that inflates to nothing
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(body.as_slice()).read_to_end_sync(&mut inflated);
    assert!(inflated.is_empty());
    let r = s
        .client
        .post(s.url("/v1/batch"))
        .basic_auth(WRITE_KEY, Some(""))
        .header("content-encoding", "gzip")
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, body) = read(r).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_compressed_body_is_capped_as_it_arrives() {
    let s = TestServer::start_with(|c| {
        c.ingest.max_event_bytes = 1_000;
        c.ingest.max_batch_bytes = 10_000;
    })
    .await;
    let body = empty_blocks_gzip(4_000); // 20 KB, over the 10 KB cap
    let mut stream = TcpStream::connect(addr(&s)).await.unwrap();
    let mut request = format!(
        "POST /v1/batch HTTP/1.1\r\nhost: t\r\nauthorization: {}\r\ncontent-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n",
        basic(WRITE_KEY)
    )
    .into_bytes();
    for chunk in body.chunks(1_000) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(&request).await.unwrap();
    let resp = read_response(&mut stream, "}}").await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
}

/// `Read::read_to_end` without the name clash with tokio's trait.
trait ReadToEndSync {
    fn read_to_end_sync(self, out: &mut Vec<u8>);
}

impl<R: std::io::Read> ReadToEndSync for R {
    fn read_to_end_sync(mut self, out: &mut Vec<u8>) {
        std::io::Read::read_to_end(&mut self, out).expect("inflate");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_encoding_names_are_case_insensitive() {
    let s = TestServer::start().await;
    let event = serde_json::to_vec(&json!({"userId": "enc", "event": "E"})).unwrap();
    for (encoding, body) in [
        ("GZIP", gzip(&event)),
        ("Gzip", gzip(&event)),
        ("x-gzip", gzip(&event)),
        ("Identity", event.clone()),
    ] {
        let r = s
            .client
            .post(s.url("/v1/track"))
            .basic_auth(WRITE_KEY, Some(""))
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, body) = read(r).await;
        assert_eq!(status, 200, "{encoding}: {body}");
    }
}

/// Asserts the `{"error":{"code","message"}}` shape and returns the code.
fn error_code(body: &Value) -> &str {
    assert!(
        body["error"]["message"].is_string(),
        "not a json error: {body}"
    );
    body["error"]["code"].as_str().expect("a code")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_status_has_a_json_body() {
    let s = TestServer::start().await;
    // 405, with Allow kept.
    let r = s.client.get(s.url("/v1/track")).send().await.unwrap();
    assert!(r.headers().get("allow").is_some());
    let (status, body) = read(r).await;
    assert_eq!((status, error_code(&body)), (405, "method_not_allowed"));
    // 415: an encoding ingest does not take.
    let r = s
        .client
        .post(s.url("/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .header("content-encoding", "br")
        .body("x")
        .send()
        .await
        .unwrap();
    let (status, body) = read(r).await;
    assert_eq!((status, error_code(&body)), (415, "unsupported_media_type"));
    // 413 from the declared length, before reading; readable by a page.
    let r = s
        .client
        .post(s.url("/v1/batch"))
        .basic_auth(WRITE_KEY, Some(""))
        .header("origin", "https://shop.example")
        .body(vec![b' '; 600_000])
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_some());
    let (status, body) = read(r).await;
    assert_eq!((status, error_code(&body)), (413, "too_large"));
    // 400 from axum's path extractor (not UTF-8).
    let (status, body) = s.get("/v1/profiles/user_id:%FF%FE/traits").await;
    assert_eq!((status, error_code(&body)), (400, "invalid_request"));
    // 404, with the request id header on every answer.
    let r = s.client.get(s.url("/nope")).send().await.unwrap();
    assert!(r.headers().get("x-request-id").is_some());
    let (status, body) = read(r).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_tells_a_request_id_and_no_internals() {
    let s = TestServer::start().await;
    s.running.as_ref().unwrap().backends.close();
    let r = s
        .client
        .post(s.url("/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({"userId": "u", "event": "E"}))
        .send()
        .await
        .unwrap();
    let header = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let (status, body) = read(r).await;
    assert_eq!(status, 503);
    assert_eq!(error_code(&body), "unavailable");
    assert_eq!(body["error"]["request_id"], header.as_str());
    let text = body.to_string();
    assert!(!text.contains("closed") && !text.contains("log"), "{text}");
    // The public readiness says down, and not why.
    let (status, body) = read(s.client.get(s.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(status, 503);
    assert_eq!(body["log"], json!({"status": "down"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_takes_metrics_and_readiness_detail() {
    let s =
        TestServer::start_with(|c| c.server.admin_listen = Some("127.0.0.1:0".parse().unwrap()))
            .await;
    let admin = format!("http://{}", s.running.as_ref().unwrap().admin_addr.unwrap());
    let (status, body) = read(s.client.get(s.url("/metrics")).send().await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let text = s
        .client
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("trailmark_http_request_duration_seconds"));
    s.running.as_ref().unwrap().backends.close();
    let (status, body) = read(
        s.client
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 503);
    assert!(body["log"]["error"].is_string(), "{body}");
    let (_, body) = read(s.client.get(s.url("/readyz")).send().await.unwrap()).await;
    assert!(body["log"].get("error").is_none(), "{body}");
}

/// The `request_ip` of the events in the log, in no particular order.
async fn logged_ips(s: &TestServer, n: usize) -> Vec<Option<String>> {
    let running = s.running.as_ref().unwrap();
    let codec = trailmark_schemas::EventCodec::new().unwrap();
    let mut sub = running
        .backends
        .log
        .subscribe("ip-test", std::sync::Arc::new(trailmark_log::FromEarliest))
        .await
        .unwrap();
    let mut ips = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while ips.len() < n && Instant::now() < deadline {
        for d in sub.poll(100, Duration::from_millis(100)).await.unwrap() {
            ips.push(codec.decode(&d.payload).unwrap().request_ip);
        }
    }
    ips
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
    let track = |s: &TestServer| {
        s.client
            .post(s.url("/v1/track"))
            .basic_auth(WRITE_KEY, Some(""))
            .header("x-forwarded-for", "6.6.6.6, 198.51.100.7")
            .json(&json!({"userId": "xff", "event": "E"}))
            .send()
    };
    let untrusting = TestServer::start().await;
    assert_eq!(track(&untrusting).await.unwrap().status(), 200);
    assert_eq!(
        logged_ips(&untrusting, 1).await,
        [Some("127.0.0.1".to_owned())]
    );
    let trusting =
        TestServer::start_with(|c| c.server.trusted_proxies = vec!["127.0.0.0/8".into()]).await;
    assert_eq!(track(&trusting).await.unwrap().status(), 200);
    // The right-most address the proxy did not add itself.
    assert_eq!(
        logged_ips(&trusting, 1).await,
        [Some("198.51.100.7".to_owned())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_is_served_gzipped_to_who_accepts_it() {
    let s = TestServer::start().await;
    let get = |encoding: Option<&str>, tag: Option<&str>| {
        let mut r = s.client.get(s.url("/sdk/v1/trailmark.min.js"));
        if let Some(e) = encoding {
            r = r.header("accept-encoding", e);
        }
        if let Some(t) = tag {
            r = r.header("if-none-match", t);
        }
        r.send()
    };
    let plain = get(None, None).await.unwrap();
    assert!(plain.headers().get("content-encoding").is_none());
    let plain_tag = plain.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(
        plain.bytes().await.unwrap(),
        trailmark_ingest::sdk::SDK_BUNDLE
    );

    let zipped = get(Some("gzip, deflate, br"), None).await.unwrap();
    assert_eq!(zipped.headers()["content-encoding"], "gzip");
    assert_eq!(zipped.headers()["vary"], "Accept-Encoding");
    let gz_tag = zipped.headers()["etag"].to_str().unwrap().to_owned();
    assert_ne!(gz_tag, plain_tag);
    let bytes = zipped.bytes().await.unwrap();
    assert!(
        bytes.len() < trailmark_ingest::sdk::SDK_BUNDLE.len() / 2,
        "{} bytes",
        bytes.len()
    );
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..]).read_to_end_sync(&mut inflated);
    assert_eq!(inflated, trailmark_ingest::sdk::SDK_BUNDLE);

    // 304 for each encoding's own tag, not for the other's.
    assert_eq!(
        get(Some("gzip"), Some(&gz_tag)).await.unwrap().status(),
        304
    );
    assert_eq!(get(None, Some(&plain_tag)).await.unwrap().status(), 304);
    assert_eq!(
        get(Some("gzip"), Some(&plain_tag)).await.unwrap().status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_item_without_message_id_has_none_in_the_answer() {
    let s = TestServer::start().await;
    let (status, body) = s
        .post(
            "/v1/batch",
            &json!({"batch": [
                {"type": "track", "userId": "m", "event": "E"},
                {"type": "track", "event": "no identity"},
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let refused = &body["rejected"][0];
    assert_eq!(refused["index"], 1);
    assert!(refused.get("messageId").is_none(), "{body}");
}

// The command line.

fn trailmark() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_trailmark"));
    c.env_remove("TRAILMARK_CONFIG").env_remove("TRAILMARK_LOG");
    c
}

fn output(c: &mut std::process::Command) -> (bool, String, String) {
    let out = c.output().expect("run trailmark");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_speaks_to_users_and_lists_the_environment() {
    let (ok, help, _) = output(trailmark().arg("--help"));
    assert!(ok);
    assert!(!help.contains("wires"), "{help}");
    for (var, _) in trailmark::config::ENV_OVERRIDES {
        assert!(help.contains(var), "--help does not mention {var}");
    }
    assert!(
        help.contains("./data"),
        "the data directory default: {help}"
    );
    // --listen only where something listens.
    let (_, serve, _) = output(trailmark().args(["serve", "--help"]));
    assert!(
        serve.contains("--listen") && serve.contains("127.0.0.1:8080"),
        "{serve}"
    );
    for cmd in ["create-workspace", "rebuild", "migrate"] {
        let (_, help, _) = output(trailmark().args([cmd, "--help"]));
        assert!(!help.contains("--listen"), "{cmd} offers --listen:\n{help}");
    }
    let (ok, _, err) =
        output(trailmark().args(["create-workspace", "--listen", "127.0.0.1:1", "--name", "x"]));
    assert!(!ok, "{err}");
}

#[test]
fn an_error_exit_prints_the_chain_and_no_backtrace() {
    let (ok, _, err) = output(trailmark().env("RUST_BACKTRACE", "1").args([
        "--config",
        "/nonexistent/trailmark.toml",
        "rebuild",
    ]));
    assert!(!ok);
    assert!(
        err.contains("error: reading /nonexistent/trailmark.toml"),
        "{err}"
    );
    assert!(err.contains("caused by:"), "{err}");
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_on_the_file_log_warns_without_colour() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_trailmark"))
        .args(["ingest", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("TRAILMARK_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(PATIENCE * 4, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("nothing will project") {
                return line;
            }
        }
        panic!("no warning before exit")
    })
    .await
    .expect("the warning in time");
    assert!(
        !line.contains('\u{1b}'),
        "colour codes into a pipe: {line:?}"
    );
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_directory_commands_say_to_stop_the_server() {
    let s = TestServer::start().await;
    for args in [
        &["create-workspace", "--name", "x"][..],
        &["dead-letters", "list"],
        &["migrate"],
    ] {
        let (ok, stdout, err) = output(trailmark().arg("--data-dir").arg(s.dir.path()).args(args));
        assert!(!ok, "{args:?} succeeded beside a running server");
        assert!(err.contains("Stop it"), "{args:?}: {err}");
        assert!(
            err.contains("one process owns the log and the store"),
            "{args:?}: {err}"
        );
        assert!(!stdout.contains("needs no migration"), "{args:?}: {stdout}");
    }
}
