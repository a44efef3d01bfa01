//! The test harness: a real application per test on port 0, against a fresh SQLite file or a
//! fresh PostgreSQL database cloned from a migrated template; per-test Redis namespaces; and
//! private `postgres` / `redis-server` instances for tests that stop them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use reqwest::{Client, Response};
use secrecy::SecretString;
use segue::bus::MemoryNetwork;
use segue::settings::Settings;
use segue::startup::Application;
use serde_json::{Value, json};

/// The signing key every test app uses, so tests can forge tokens on purpose.
pub const TEST_JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// The shared PostgreSQL server tests create their databases on.
pub fn admin_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The shared Redis tests namespace their keys in.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A random lower-case suffix for names that must not collide between parallel tests.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        segue::auth::random_token(9)
            .to_ascii_lowercase()
            .replace('-', "_")
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// One running hub plus what it needs cleaned up.
pub struct TestApp {
    pub address: String,
    pub client: Client,
    pub settings: Settings,
    /// Removed on drop.
    data_dir: PathBuf,
    /// Dropped on drop.
    database: Option<String>,
    server: actix_web::dev::ServerHandle,
}

/// A registered account and its first session.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: i64,
    pub handle: String,
    pub password: String,
    pub access_token: String,
    pub refresh_token: String,
    pub device_id: String,
}

/// Settings for a test app: port 0, its own data directory, the test signing key.
pub fn test_settings(data_dir: &Path) -> Settings {
    Settings {
        bind: "127.0.0.1:0".into(),
        data_dir: data_dir.to_path_buf(),
        static_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("static"),
        jwt_secret: Some(TEST_JWT_SECRET.into()),
        workers: Some(1),
        db_pool_size: 4,
        // Short, so tests that watch a device leave need not wait the default 3 s.
        presence_leave_delay_ms: 100,
        ..Settings::default()
    }
    // Tests register and log in far faster than people do; the rate-limit tests turn on the
    // limits they test.
    .with_limits_off()
}

/// The environment that turns every rate limit off, for hubs run as processes.
pub const NO_RATE_LIMITS: [(&str, &str); 11] = [
    ("SEGUE_RATE_LIMIT_LOGIN_IP", "off"),
    ("SEGUE_RATE_LIMIT_LOGIN_HANDLE", "off"),
    ("SEGUE_RATE_LIMIT_REGISTER_IP", "off"),
    ("SEGUE_RATE_LIMIT_REFRESH_SESSION", "off"),
    ("SEGUE_RATE_LIMIT_ACCOUNT", "off"),
    ("SEGUE_RATE_LIMIT_ANONYMOUS_IP", "off"),
    ("SEGUE_RATE_LIMIT_INGEST_DEVICE", "off"),
    ("SEGUE_RATE_LIMIT_SOCKET_IP", "off"),
    ("SEGUE_RATE_LIMIT_SOCKET_MESSAGES", "off"),
    ("SEGUE_IP_BLOCK_AFTER", "off"),
    ("SEGUE_DEVICE_ACCOUNTS_MAX", "0"),
];

/// Settings with a data directory and (for PostgreSQL) a database of their own.
async fn fresh_settings(backend: Backend) -> (Settings, PathBuf, Option<String>) {
    let data_dir = temp_dir("app");
    let mut settings = test_settings(&data_dir);
    let database = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => {
            let (name, url) = fresh_postgres_database().await;
            settings.database_url = Some(url.into());
            Some(name)
        }
    };
    (settings, data_dir, database)
}

/// A fresh, empty directory under the system temp dir.
pub fn temp_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(&format!("segue_{label}")));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

impl TestApp {
    /// A hub on `backend` with a database of its own.
    pub async fn spawn(backend: Backend) -> Self {
        let (settings, data_dir, database) = fresh_settings(backend).await;
        Self::spawn_with(settings, data_dir, database).await
    }

    /// A hub on `backend` that also uses the shared Redis, under a namespace of its own.
    pub async fn spawn_with_redis(backend: Backend) -> Self {
        let (mut settings, data_dir, database) = fresh_settings(backend).await;
        settings.redis_url = Some(redis_url().into());
        settings.redis_namespace = unique("segue_test");
        Self::spawn_with(settings, data_dir, database).await
    }

    /// A hub on `backend` with some settings changed.
    pub async fn spawn_tuned(backend: Backend, tune: impl FnOnce(&mut Settings)) -> Self {
        let (mut settings, data_dir, database) = fresh_settings(backend).await;
        tune(&mut settings);
        Self::spawn_with(settings, data_dir, database).await
    }

    /// A hub with hand-made settings; `data_dir` is removed and `database` dropped on drop.
    pub async fn spawn_with(
        settings: Settings,
        data_dir: PathBuf,
        database: Option<String>,
    ) -> Self {
        Self::spawn_on(settings, data_dir, database, MemoryNetwork::new()).await
    }

    /// Like [`spawn_with`](Self::spawn_with), with the in-process bus on `network`.
    pub async fn spawn_on(
        settings: Settings,
        data_dir: PathBuf,
        database: Option<String>,
        network: MemoryNetwork,
    ) -> Self {
        let app = Application::build_on(settings.clone(), network)
            .await
            .expect("application builds");
        let address = format!("http://127.0.0.1:{}", app.port());
        let server = app.handle();
        actix_web::rt::spawn(app.run_until_stopped());
        Self {
            address,
            client: Client::new(),
            settings,
            data_dir,
            database,
            server,
        }
    }

    /// Stops the server (waiting for it), keeping data dir and database.
    pub async fn stop(&self) {
        self.server.stop(false).await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent")
    }

    pub async fn get_with_token(&self, path: &str, token: &str) -> Response {
        self.client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request sent")
    }

    /// The account's recorded plays, newest first (`GET /history/`).
    pub async fn history(&self, account: &Account) -> Vec<Value> {
        let body: Value = self
            .get_with_token("/history/", &account.access_token)
            .await
            .json()
            .await
            .expect("history JSON");
        body["plays"].as_array().cloned().unwrap_or_default()
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_json_authed(&self, path: &str, token: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn register_raw(&self, handle: &str, password: &str) -> Response {
        self.post_json(
            "/auth/register",
            &json!({"handle": handle, "password": password}),
        )
        .await
    }

    pub async fn login_raw(&self, handle: &str, password: &str) -> Response {
        self.post_json(
            "/auth/login",
            &json!({"handle": handle, "password": password}),
        )
        .await
    }

    pub async fn refresh_raw(&self, refresh_token: &str) -> Response {
        self.post_json("/auth/refresh", &json!({"refresh_token": refresh_token}))
            .await
    }

    /// `PATCH /preferences/` with `body` as `account`.
    pub async fn patch_preferences(&self, account: &Account, body: &Value) -> Response {
        self.client
            .patch(self.url("/preferences/"))
            .bearer_auth(&account.access_token)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// `POST /auth/logout` with `token`.
    pub async fn logout(&self, token: &str) -> Response {
        self.client
            .post(self.url("/auth/logout"))
            .bearer_auth(token)
            .send()
            .await
            .expect("request sent")
    }

    /// The value of a metric in this app's `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        metric(&self.address, name).await
    }

    /// Waits (up to 5 s) until `/readyz` answers 200.
    pub async fn wait_until_ready(&self) -> bool {
        for _ in 0..50 {
            if self.get("/readyz").await.status() == 200 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// Registers a fresh account with a unique handle.
    pub async fn register(&self) -> Account {
        let handle = unique("user")
            .replace('_', "")
            .chars()
            .take(20)
            .collect::<String>();
        let password = "correct horse battery".to_owned();
        let response = self.register_raw(&handle, &password).await;
        assert_eq!(response.status(), 201, "register {handle}");
        let body: Value = response.json().await.expect("json body");
        account_from(&body, &handle, &password)
    }

    /// Upserts catalog tracks as `account`.
    pub async fn seed_tracks(&self, account: &Account, tracks: &Value) {
        let response = self
            .post_json_authed("/tracks", &account.access_token, &json!({"tracks": tracks}))
            .await;
        assert_eq!(response.status(), 200, "seed tracks");
    }
}

/// Which bus the replicas of a test cluster share.
pub enum ClusterBus {
    /// One in-process network.
    Memory,
    /// A Redis at this URL, under one fresh namespace.
    Redis(String),
}

/// `count` replicas sharing one fresh PostgreSQL database, one signing key and one bus.
pub async fn spawn_cluster(count: usize, bus: ClusterBus) -> Vec<TestApp> {
    spawn_cluster_tuned(count, bus, |_| {}).await
}

/// Like [`spawn_cluster`], with `tune` applied to every replica's settings.
pub async fn spawn_cluster_tuned(
    count: usize,
    bus: ClusterBus,
    tune: impl Fn(&mut Settings),
) -> Vec<TestApp> {
    spawn_cluster_each(count, bus, |_, settings| tune(settings)).await
}

/// Like [`spawn_cluster`], with `tune(index, settings)` applied to each replica's settings.
pub async fn spawn_cluster_each(
    count: usize,
    bus: ClusterBus,
    tune: impl Fn(usize, &mut Settings),
) -> Vec<TestApp> {
    let (name, url) = fresh_postgres_database().await;
    let namespace = unique("segue_test");
    let network = MemoryNetwork::new();
    let mut replicas = Vec::with_capacity(count);
    for index in 0..count {
        let data_dir = temp_dir("replica");
        let mut settings = test_settings(&data_dir);
        settings.database_url = Some(url.clone().into());
        settings.redis_namespace = namespace.clone();
        if let ClusterBus::Redis(redis) = &bus {
            settings.redis_url = Some(redis.clone().into());
        }
        tune(index, &mut settings);
        // The first replica drops the shared database when the test ends.
        let owner = (index == 0).then(|| name.clone());
        replicas.push(TestApp::spawn_on(settings, data_dir, owner, network.clone()).await);
    }
    replicas
}

/// The value of a metric in the `/metrics` of the hub at `base` (0 when absent).
pub async fn metric(base: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Reads an account out of a register/login/refresh response.
pub fn account_from(body: &Value, handle: &str, password: &str) -> Account {
    Account {
        id: body["user"]["id"].as_i64().expect("user id"),
        handle: handle.to_owned(),
        password: password.to_owned(),
        access_token: body["access_token"]
            .as_str()
            .expect("access token")
            .to_owned(),
        refresh_token: body["refresh_token"]
            .as_str()
            .expect("refresh token")
            .to_owned(),
        device_id: body["device_id"].as_str().expect("device id").to_owned(),
    }
}

/// Asserts the house error shape and returns the `code`.
pub async fn error_code(response: Response, status: u16) -> String {
    assert_eq!(response.status().as_u16(), status, "status");
    let body: Value = response.json().await.expect("error body is JSON");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "detail in {body}"
    );
    body["code"].as_str().expect("code").to_owned()
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let handle = self.server.clone();
        // Stops accepting and lets workers end; the future need not be awaited for that.
        drop(handle.stop(false));
        let _ = std::fs::remove_dir_all(&self.data_dir);
        if let Some(name) = self.database.take() {
            drop_database_blocking(name);
        }
    }
}

/// Runs `f` to completion on a runtime of its own, on a thread of its own, so that it can be
/// called from `Drop` or from within another runtime.
pub fn block_on_thread<T: Send + 'static>(
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    })
    .join()
    .expect("helper thread")
}

pub fn drop_database_blocking(name: String) {
    block_on_thread(async move {
        if let Ok(mut admin) = AsyncPgConnection::establish(&admin_database_url()).await {
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await;
        }
    });
}

/// The name of the migrated template, derived from the migrations' contents so a changed
/// migration gets a new template.
fn template_name() -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres");
    let mut files: Vec<PathBuf> = walk(&dir);
    files.sort();
    let mut hasher = DefaultHasher::new();
    for file in files {
        file.strip_prefix(&dir).ok().hash(&mut hasher);
        std::fs::read(&file)
            .expect("read migration")
            .hash(&mut hasher);
    }
    format!("segue_tpl_{:016x}", hasher.finish())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)
        .expect("read migrations dir")
        .flatten()
    {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Creates a database cloned from the migrated template (creating the template first if this
/// is the first test to need it, under an advisory lock so parallel test processes agree).
/// Returns its name and URL.
pub async fn fresh_postgres_database() -> (String, String) {
    block_on_thread(async {
        let admin_url = admin_database_url();
        let mut admin = AsyncPgConnection::establish(&admin_url)
            .await
            .expect("connect to PostgreSQL (is it running on 127.0.0.1:5432? see scripts/test.sh)");
        let template = template_name();
        ensure_template(&mut admin, &admin_url, &template).await;
        let name = unique("segue_test");
        admin
            .batch_execute(&format!(
                "CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""
            ))
            .await
            .expect("create test database");
        let url = with_database(&admin_url, &name);
        (name, url)
    })
}

/// Drops the named test database when it goes out of scope.
pub struct DatabaseGuard(pub String);

impl Drop for DatabaseGuard {
    fn drop(&mut self) {
        drop_database_blocking(self.0.clone());
    }
}

/// `admin_url` with its database name replaced.
pub fn with_database(admin_url: &str, name: &str) -> String {
    let base = admin_url
        .rsplit_once('/')
        .map(|(base, _)| base)
        .unwrap_or(admin_url);
    format!("{base}/{name}")
}

async fn ensure_template(admin: &mut AsyncPgConnection, admin_url: &str, template: &str) {
    use diesel::sql_types::{BigInt, Text};
    use diesel_async::RunQueryDsl;

    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    admin
        .batch_execute("SELECT pg_advisory_lock(727274)")
        .await
        .expect("advisory lock");
    let found: Count =
        diesel::sql_query("SELECT count(*) AS n FROM pg_database WHERE datname = $1")
            .bind::<Text, _>(template)
            .get_result(admin)
            .await
            .expect("look up template");
    if found.n == 0 {
        let building = format!("{template}_building");
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{building}\" WITH (FORCE)"
            ))
            .await
            .expect("drop stale template");
        admin
            .batch_execute(&format!("CREATE DATABASE \"{building}\""))
            .await
            .expect("create template");
        let dir = temp_dir("template");
        let mut settings = test_settings(&dir);
        settings.database_url = Some(SecretString::from(with_database(admin_url, &building)));
        // Migrating is what opening a store does; the store is dropped straight after.
        let store = segue::store::Store::connect(&settings)
            .await
            .expect("migrate template");
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
        admin
            .batch_execute(&format!(
                "ALTER DATABASE \"{building}\" RENAME TO \"{template}\""
            ))
            .await
            .expect("publish template");
    }
    admin
        .batch_execute("SELECT pg_advisory_unlock(727274)")
        .await
        .expect("advisory unlock");
}

/// A free TCP port on loopback (free when asked; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Prefix for running a server binary: as `postgres` when we are root (PostgreSQL refuses
/// to run as root).
fn as_postgres_user(program: &str) -> Command {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if is_root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--", program]);
        command
    } else {
        Command::new(program)
    }
}

/// Finds a PostgreSQL server binary (`initdb`, `pg_ctl`) on PATH or in Debian's location.
fn pg_binary(name: &str) -> String {
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        versions.sort();
        if let Some(found) = versions
            .iter()
            .rev()
            .map(|v| v.join("bin").join(name))
            .find(|p| p.exists())
        {
            return found.to_string_lossy().into_owned();
        }
    }
    name.to_owned()
}

/// A PostgreSQL cluster of our own, on a free port, for tests that stop it.
pub struct PrivatePostgres {
    dir: PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    pub fn start() -> Self {
        let dir = temp_dir("pg");
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status();
        let data = dir.join("data");
        let status = as_postgres_user(&pg_binary("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run initdb");
        assert!(status.success(), "initdb failed");
        let port = free_port();
        let this = Self { dir, port };
        this.resume();
        this
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Starts (or restarts) the server and waits until it accepts connections.
    pub fn resume(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let status = as_postgres_user(&pg_binary("pg_ctl"))
            .args(["-w", "-l"])
            .arg(self.dir.join("log"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-o", &options, "start"])
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl start");
        assert!(status.success(), "pg_ctl start failed");
    }

    /// Creates database `name` on it.
    pub fn create_database(&self, name: &str) {
        use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
        let admin = self.url("postgres");
        let statement = format!("CREATE DATABASE {name}");
        block_on_thread(async move {
            let mut conn = AsyncPgConnection::establish(&admin)
                .await
                .expect("connect private pg");
            conn.batch_execute(&statement).await.expect("create db");
        });
    }

    /// Restarts the server in `mode` (`fast`: sessions are ended cleanly; `immediate`: as a
    /// crash, with recovery at start).
    pub fn restart(&self, mode: &str) {
        let status = as_postgres_user(&pg_binary("pg_ctl"))
            .args(["-m", mode, "-w", "-D"])
            .arg(self.dir.join("data"))
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run pg_ctl stop");
        assert!(status.success(), "pg_ctl stop -m {mode} failed");
        self.resume();
    }

    /// Sends `signal` (`STOP`, `CONT`) to the server and every process it runs.
    pub fn signal_all(&self, signal: &str) {
        let pid_file = std::fs::read_to_string(self.dir.join("data").join("postmaster.pid"))
            .expect("postmaster.pid");
        let postmaster = pid_file.lines().next().expect("pid line").trim().to_owned();
        let status = Command::new("pkill")
            .args([&format!("-{signal}"), "-P", &postmaster])
            .status()
            .expect("pkill");
        assert!(
            status.success(),
            "pkill -{signal} found no server processes"
        );
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &postmaster])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {postmaster} failed");
    }

    /// Stops the server at once (as a crash would).
    pub fn halt(&self) {
        let _ = as_postgres_user(&pg_binary("pg_ctl"))
            .args(["-m", "immediate", "-w", "-D"])
            .arg(self.dir.join("data"))
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // A test that failed while the server was paused must not leave pg_ctl waiting on it.
        if let Ok(pid_file) = std::fs::read_to_string(self.dir.join("data").join("postmaster.pid"))
            && let Some(postmaster) = pid_file.lines().next()
        {
            let _ = Command::new("pkill")
                .args(["-CONT", "-P", postmaster.trim()])
                .status();
            let _ = Command::new("kill")
                .args(["-CONT", postmaster.trim()])
                .status();
        }
        self.halt();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `redis-server` of our own, on a free port, for tests that stop it.
pub struct PrivateRedis {
    child: Option<Child>,
    pub port: u16,
    /// With an append-only file here, the data survives a restart.
    aof_dir: Option<PathBuf>,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let mut this = Self {
            child: None,
            port: free_port(),
            aof_dir: None,
        };
        this.resume();
        this
    }

    /// A server that keeps an append-only file (`appendfsync always`), as a deployment whose
    /// job streams must survive a restart does (`everysec` there).
    pub fn start_durable() -> Self {
        let mut this = Self {
            child: None,
            port: free_port(),
            aof_dir: Some(temp_dir("redis-aof")),
        };
        this.resume();
        this
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs one command with `redis-cli` and returns what it printed.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts (or restarts) the server on the same port and waits until it answers.
    pub fn resume(&mut self) {
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            // Fault tests hang the server on purpose with DEBUG SLEEP.
            "--enable-debug-command",
            "local",
        ]
        .map(String::from)
        .to_vec();
        match &self.aof_dir {
            Some(dir) => args.extend(
                [
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--dir",
                    &dir.display().to_string(),
                ]
                .map(String::from),
            ),
            None => args.extend(["--appendonly", "no"].map(String::from)),
        }
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// Kills the server at once.
    pub fn halt(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.halt();
        if let Some(dir) = &self.aof_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The `segue` binary running as a process of its own (for tests that measure or kill it).
pub struct HubProcess {
    pub child: Child,
    pub address: String,
    /// The `DATABASE_URL` it was started with, if any.
    pub database_url: Option<String>,
    data_dir: PathBuf,
}

impl HubProcess {
    /// Registers a fresh account on this hub.
    pub async fn register(&self) -> Account {
        let handle: String = unique("hp").replace('_', "").chars().take(20).collect();
        let password = "correct horse battery";
        let registered: Value = reqwest::Client::new()
            .post(format!("{}/auth/register", self.address))
            .json(&json!({"handle": handle, "password": password}))
            .send()
            .await
            .expect("register")
            .json()
            .await
            .expect("json body");
        account_from(&registered, &handle, password)
    }

    /// Starts the binary on a free port with `env` (and a fresh data directory), and waits
    /// until `/healthz` answers.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        let data_dir = temp_dir("process");
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_segue"));
        command
            .env_clear()
            .env("SEGUE_DATA_DIR", &data_dir)
            .env("SEGUE_BIND", format!("127.0.0.1:{port}"))
            .env("SEGUE_JWT_SECRET", TEST_JWT_SECRET)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(data_dir.join("stderr.log")).expect("log file"))
            .envs(NO_RATE_LIMITS);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("start segue");
        let this = Self {
            child,
            address: format!("http://127.0.0.1:{port}"),
            database_url: env
                .iter()
                .find(|(key, _)| *key == "DATABASE_URL")
                .map(|(_, value)| (*value).to_owned()),
            data_dir,
        };
        let client = Client::new();
        for _ in 0..200 {
            let up = client.get(format!("{}/healthz", this.address)).send().await;
            if up.is_ok_and(|r| r.status() == 200) {
                return this;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("segue did not come up");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line")
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// What the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// Generates one test per backend from `async fn name(app: TestApp)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use $crate::helpers::{Backend, TestApp};

                #[actix_web::test]
                async fn sqlite() {
                    super::$name(TestApp::spawn(Backend::Sqlite).await).await;
                }

                #[actix_web::test]
                async fn postgres() {
                    super::$name(TestApp::spawn(Backend::Postgres).await).await;
                }
            }
        )*
    };
}

/// Generates one test per bus from `async fn name(replicas: Vec<TestApp>)`, given two
/// replicas sharing one PostgreSQL database: on the in-process network, and over Redis.
#[macro_export]
macro_rules! on_both_buses {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use $crate::helpers::{ClusterBus, redis_url, spawn_cluster};

                #[actix_web::test]
                async fn memory() {
                    super::$name(spawn_cluster(2, ClusterBus::Memory).await).await;
                }

                #[actix_web::test]
                async fn redis() {
                    super::$name(spawn_cluster(2, ClusterBus::Redis(redis_url())).await).await;
                }
            }
        )*
    };
}

/// The S3-compatible test server (`s3s-fs`), as `scripts/test.sh` installs it: `SEGUE_S3S_FS`,
/// else `$HOME/.cache/segue-tools/bin/s3s-fs`.
pub fn s3s_fs_binary() -> PathBuf {
    std::env::var_os("SEGUE_S3S_FS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/segue-tools/bin/s3s-fs")
        })
}

pub const S3_ACCESS_KEY: &str = "segue-test-access";
pub const S3_SECRET_KEY: &str = "segue-test-secret-key";

/// An `s3s-fs` server of our own, on a free port over a fresh directory, for one test.
pub struct PrivateS3 {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl PrivateS3 {
    /// Starts the server with bucket `bucket` (a directory, for s3s-fs) and waits until it
    /// answers.
    pub fn start(bucket: &str) -> Self {
        let dir = temp_dir("s3");
        std::fs::create_dir_all(dir.join(bucket)).expect("bucket directory");
        let mut this = Self {
            child: None,
            port: free_port(),
            dir,
        };
        this.resume();
        this
    }

    /// Every file the server keeps (objects, and the parts of unfinished uploads).
    pub fn files(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut dirs = vec![self.dir.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    found.push(path);
                }
            }
        }
        found
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Settings for `bucket` on this server.
    pub fn settings(&self, bucket: &str) -> segue::blobs::S3Settings {
        segue::blobs::S3Settings {
            endpoint: Some(self.endpoint()),
            bucket: bucket.to_owned(),
            region: "us-east-1".to_owned(),
            access_key_id: S3_ACCESS_KEY.to_owned(),
            secret_access_key: S3_SECRET_KEY.into(),
            public_base_url: None,
        }
    }

    /// Starts (or restarts) the server on the same port and directory.
    pub fn resume(&mut self) {
        let binary = s3s_fs_binary();
        let child = Command::new(&binary)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "start {} (scripts/test.sh installs it): {e}",
                    binary.display()
                )
            });
        self.child = Some(child);
        for _ in 0..250 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("s3s-fs did not start on port {}", self.port);
    }

    /// Kills the server at once.
    pub fn halt(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateS3 {
    fn drop(&mut self) {
        self.halt();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
