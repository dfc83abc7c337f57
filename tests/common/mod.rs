//! Shared helpers for the integration tests: a real server on 127.0.0.1:0 with a temporary database.
#![allow(dead_code)]

pub mod process;
pub mod rng;

use hubbub::auth::HashParams;
use hubbub::client::{Client, ClientError};
use hubbub::{Config, RunningServer, Server};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The password every test user has: [`TestServer::user`], [`TestServer::register`] and the logins here use it, and
/// so do the suites that drive the real binary ([`process::ServerProcess::login`]) or the CLI.
pub const PASSWORD: &str = "password123";

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
        c.register(name, PASSWORD).unwrap();
        c.login(name, PASSWORD, "test", 0).unwrap();
        c
    }

    /// Registers a user on a throwaway connection without logging in (they stay offline, never seen).
    pub fn register(&self, name: &str) {
        self.connect()
            .register(name, PASSWORD)
            .unwrap_or_else(|e| panic!("register {name}: {e}"));
    }

    /// Another logged-in session of an existing user (`last_seen` 0); its catch-up is left to the caller.
    pub fn login(&self, name: &str, device: &str) -> Client {
        self.login_at(name, device, 0)
    }

    /// A session of an existing user logged in with an explicit `last_seen`; its catch-up is left to the caller.
    pub fn login_at(&self, name: &str, device: &str, last_seen: u64) -> Client {
        let mut c = self.connect();
        c.login(name, PASSWORD, device, last_seen).unwrap();
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
