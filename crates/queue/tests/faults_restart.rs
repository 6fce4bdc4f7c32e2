//! Fault test: the queue's server restarts in the middle of a run.
//!
//! Starts a PRIVATE PostgreSQL (initdb into a temp dir, trust auth, a free
//! port; as the `postgres` user through `runuser` when the test runs as
//! root) or a PRIVATE `nats-server -js` (its own store dir, a free port),
//! runs two `queue-fault-worker` processes while the test enqueues a
//! stream of jobs, and stops the server mid-run (PostgreSQL: `pg_ctl stop
//! -m immediate`, a crash without a checkpoint; NATS: SIGTERM), waits
//! 1.5 s and starts it again on the same port and data. The workers record
//! their runs in a SQLite file (it must stay up). Every accepted job must
//! end `succeeded`, none may run after its success, and the same worker
//! processes must carry on (they reconnect by themselves) and record
//! successes after the restart. Skipped when the server binaries are not
//! installed.

mod faults_support;

use faults_support::{check, wait_finished, Backend, Workers};
use shoal_backends::now_millis;
use shoal_testkit as kit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const JOBS: usize = 3_000;
const WORKERS: usize = 2;
const CONCURRENCY: usize = 8;
const LEASE: Duration = Duration::from_secs(2);
const SLEEP_MAX_MS: u64 = 20;
/// Enqueue rate: `PER_TICK` jobs every 10 ms (400/s), so the stream runs
/// about 7.5 s and the server goes down 2 s into it.
const PER_TICK: usize = 4;
const STOP_AFTER: Duration = Duration::from_secs(2);
const DOWN_FOR: Duration = Duration::from_millis(1500);

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

trait Server {
    fn stop(&mut self);
    fn start(&mut self);
}

// ---- PostgreSQL ------------------------------------------------------------

fn postgres_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Postgres {
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn init(bin: PathBuf, dir: &Path) -> Postgres {
        let as_postgres = running_as_root();
        if as_postgres {
            // initdb refuses to run as root: the cluster belongs to `postgres`.
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown the temp dir to postgres");
        }
        let pg = Postgres {
            bin,
            dir: dir.to_path_buf(),
            port: kit::free_port(),
            as_postgres,
        };
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-A", "trust", "-U", "root", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://root@127.0.0.1:{}/{db}", self.port)
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Server for Postgres {
    fn start(&mut self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.display()
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(["-w", "-t", "30", "-o", &opts, "start"])
            .stdout(Stdio::null())
            .output()
            .expect("pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn stop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- NATS ------------------------------------------------------------------

fn nats_bin() -> Option<PathBuf> {
    [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

struct Nats {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Nats {
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Server for Nats {
    fn start(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("nats.log"))
            .expect("nats log");
        let child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.join("store"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM: a clean stop (JetStream flushes its store).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- the scenario ----------------------------------------------------------

async fn run(backend: Backend, server: &mut dyn Server) {
    let backend = backend.record_in_sqlite().await;
    let mut workers = Workers::new(&backend, CONCURRENCY, SLEEP_MAX_MS);
    workers.start(WORKERS);
    let pids = workers.pids();

    // The producer: a steady stream of jobs, retried through the outage
    // (each job has a unique key, so a retry after an ambiguous failure
    // finds the job instead of adding a second one).
    let store = backend.store.clone();
    let producer = tokio::spawn(async move {
        let mut ids = Vec::with_capacity(JOBS);
        let mut failures = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut n = 0;
        while n < JOBS {
            tick.tick().await;
            for _ in 0..PER_TICK.min(JOBS - n) {
                loop {
                    match store.enqueue(Backend::job(n)).await {
                        Ok(e) => break ids.push(e.id),
                        Err(_) => {
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                n += 1;
            }
        }
        (ids, failures)
    });

    let begun = Instant::now();
    let begun_ms = now_millis();
    tokio::time::sleep(STOP_AFTER).await;
    let stopped_at = now_millis();
    tokio::task::block_in_place(|| server.stop());
    tokio::time::sleep(DOWN_FOR).await;
    tokio::task::block_in_place(|| server.start());
    let restarted_at = now_millis();
    println!(
        "{}: server stopped at +{} ms, back at +{} ms",
        backend.name,
        stopped_at - begun_ms,
        restarted_at - begun_ms
    );

    let (ids, enqueue_failures) = tokio::time::timeout(Duration::from_secs(60), producer)
        .await
        .expect("the producer finished within 60 s")
        .expect("producer task");
    let finished = wait_finished(&backend, now_millis() + 60_000).await;
    let elapsed = begun.elapsed();
    let crashed = workers.exited();
    let counts = check(&backend, &ids).await;
    let after: Vec<(i64, i64)> =
        sqlx::query_as("SELECT pid, COUNT(*) FROM fault_successes WHERE at_ms > $1 GROUP BY pid")
            .bind(restarted_at)
            .fetch_all(backend.record.pool())
            .await
            .expect("successes after the restart");
    println!(
        "{}: finished={finished} in {elapsed:?}; enqueue errors retried during the outage={enqueue_failures}; \
         successes after the restart by pid={after:?} (workers {pids:?})\n{}: {counts}",
        backend.name, backend.name
    );
    let idle: Vec<_> = pids
        .iter()
        .filter(|&&pid| !after.iter().any(|(p, n)| *p == pid && *n > 0))
        .collect();
    if !finished || counts.violations() > 0 || !crashed.is_empty() || !idle.is_empty() {
        println!("worker log tail:\n{}", workers.log_tail());
        println!("{}", backend.nats_state().await);
    }
    assert!(crashed.is_empty(), "workers died: {crashed:?}");
    assert!(finished, "jobs left unfinished: {counts}");
    assert_eq!(counts.violations(), 0, "{counts}");
    assert_eq!(counts.succeeded, JOBS, "{counts}");
    for pid in pids {
        assert!(
            after.iter().any(|(p, n)| *p == pid && *n > 0),
            "worker {pid} completed nothing after the restart: {after:?}"
        );
    }
    workers.kill_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_run() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(bin) = postgres_bin() else {
        println!("skipped: no PostgreSQL server binaries under /usr/lib/postgresql/*/bin");
        return;
    };
    let dir = kit::TempDir::new("faults-pg");
    let mut pg = Postgres::init(bin, dir.path());
    pg.start();
    let admin = faults_support::connect_db(&pg.url("postgres")).await;
    sqlx::query("CREATE DATABASE jobs")
        .execute(admin.pool())
        .await
        .expect("create database");
    admin.pool().close().await;
    let work = kit::TempDir::new("faults-pg-work");
    let backend = Backend::sql("postgres", pg.url("jobs"), LEASE, work).await;
    run(backend, &mut pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_run() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(bin) = nats_bin() else {
        println!("skipped: nats-server is not installed");
        return;
    };
    let dir = kit::TempDir::new("faults-nats");
    let mut nats = Nats {
        bin,
        dir: dir.path().to_path_buf(),
        port: kit::free_port(),
        child: None,
    };
    nats.start();
    let work = kit::TempDir::new("faults-nats-work");
    let backend = Backend::nats(nats.url(), LEASE, work).await;
    run(backend, &mut nats).await;
}
