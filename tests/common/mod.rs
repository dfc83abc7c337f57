//! Shared helpers for the integration tests: a real server on 127.0.0.1:0 with a temporary database.
#![allow(dead_code)]

pub mod process;

use hubbub::auth::HashParams;
use hubbub::client::{Client, ClientError};
use hubbub::{Config, RunningServer, Server};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A server running on its own thread for one test; shut down (gracefully) when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    pub config: Config,
    running: Option<RunningServer>,
    pub dir: tempfile::TempDir,
}

/// The configuration tests start from: loopback, port 0, a fresh database, cheap argon2.
pub fn test_config(dir: &tempfile::TempDir) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        db: dir.path().join("hubbub.db"),
        hash_params: HashParams::TEST,
        hash_threads: 1,
        ..Config::default()
    }
}

pub fn start() -> TestServer {
    start_with(|_| {})
}

pub fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir);
    adjust(&mut config);
    start_in(dir, config)
}

pub fn start_in(dir: tempfile::TempDir, config: Config) -> TestServer {
    let running = Server::bind(config.clone()).unwrap().spawn().unwrap();
    TestServer {
        addr: running.addr,
        config,
        running: Some(running),
        dir,
    }
}

impl TestServer {
    pub fn connect(&self) -> Client {
        Client::connect(self.addr).unwrap()
    }

    /// A new user, registered and logged in on a fresh connection.
    pub fn user(&self, name: &str) -> Client {
        let mut c = self.connect();
        c.register(name, "password123").unwrap();
        c.login(name, "password123", "test", 0).unwrap();
        c
    }

    /// Another logged-in session of an existing user.
    pub fn login(&self, name: &str, device: &str) -> Client {
        let mut c = self.connect();
        c.login(name, "password123", device, 0).unwrap();
        c
    }

    /// Stops the server and waits for it (graceful shutdown).
    pub fn stop(mut self) -> tempfile::TempDir {
        if let Some(r) = self.running.take() {
            r.shutdown().unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.shutdown();
        }
    }
}

/// The server error code of a failed call.
pub fn code_of<T: std::fmt::Debug>(result: Result<T, ClientError>) -> u16 {
    match result {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// Polls `check` until it holds or `within` passes.
pub fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}
