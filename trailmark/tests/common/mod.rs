//! A real Trailmark server on port 0 for integration tests, and an HTTP client
//! that speaks to it.

#![allow(dead_code)]

use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use trailmark::app::{self, Role, Running};
use trailmark::config::Config;

pub const WRITE_KEY: &str = "wk_integration";
pub const TOKEN: &str = "tmk_integration";

pub struct TestServer {
    pub base: String,
    pub running: Option<Running>,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, tweak).await
    }

    pub async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::for_test(dir.path());
        config.bootstrap.write_key = Some(WRITE_KEY.into());
        config.bootstrap.token = Some(TOKEN.into());
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .expect("bind");
        let running = app::start(config, Role::All, listener)
            .await
            .expect("start");
        Self {
            base: format!("http://{}", running.addr),
            running: Some(running),
            client: reqwest::Client::new(),
            dir,
        }
    }

    /// Stops the server and returns its data directory, for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.running
            .take()
            .expect("running")
            .stop()
            .await
            .expect("clean stop");
        self.dir
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs JSON with the write key as Basic auth.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .client
            .post(self.url(path))
            .basic_auth(WRITE_KEY, Some(""))
            .json(body)
            .send()
            .await
            .expect("request");
        read(resp).await
    }

    /// GETs with the secret token as a Bearer token.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .client
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("request");
        read(resp).await
    }

    /// Polls a profile's timeline until it holds `n` events (or 10 s pass).
    pub async fn wait_for_events(&self, id: &str, n: usize) -> Vec<Value> {
        let mut last = Vec::new();
        for _ in 0..200 {
            let (status, body) = self
                .get(&format!("/v1/profiles/{id}/events?limit=200&sort=asc"))
                .await;
            if status == 200 {
                last = body["data"].as_array().cloned().unwrap_or_default();
                if last.len() >= n {
                    return last;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        last
    }
}

pub async fn read(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

pub fn basic(user: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
    )
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}
