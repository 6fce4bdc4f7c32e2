//! Role entry points: each turns the settings into a running role (or a
//! one-shot command) and returns when it has stopped cleanly.

use crate::cli::{Cli, Command, JobsCommand};
use anyhow::Context as _;
use axum::response::IntoResponse as _;
use axum::routing::get;
use shoal_core::Settings;
use shoal_queue::{JobFilter, JobState, JobStore, Worker, WorkerOptions};
use shoal_runtime::{Application, ServiceModule};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Every service this binary can run.
/// Shoal's own services.
pub(crate) fn own_modules() -> Vec<shoal_runtime::app::ModuleFactory> {
    fn of<M: ServiceModule + Default + 'static>() -> shoal_runtime::app::ModuleFactory {
        std::sync::Arc::new(|| Box::new(M::default()) as Box<dyn ServiceModule>)
    }
    vec![
        of::<shoal_accounts::Accounts>(),
        of::<shoal_catalog::Catalog>(),
        of::<shoal_media::Media>(),
        of::<shoal_orders::Orders>(),
        of::<shoal_payments::Payments>(),
        of::<shoal_notifications::Notifications>(),
    ]
}

/// The modules this binary runs: set once by `Builder::run`.
static MODULES: std::sync::OnceLock<Vec<shoal_runtime::app::ModuleFactory>> =
    std::sync::OnceLock::new();

pub(crate) fn set_modules(modules: Vec<shoal_runtime::app::ModuleFactory>) {
    let _ = MODULES.set(modules);
}

/// A fresh instance of each module this binary runs.
pub fn modules() -> Vec<Box<dyn ServiceModule>> {
    MODULES
        .get_or_init(own_modules)
        .iter()
        .map(|make| make())
        .collect()
}

pub async fn run(cli: Cli, settings: Settings) -> anyhow::Result<ExitCode> {
    // Install the metrics recorder before anything records.
    let _ = shoal_core::telemetry::prometheus();
    let shutdown = shoal_core::shutdown::on_signals();
    if let Some(parent) = cli.parent_pid {
        shoal_core::shutdown::exit_with_parent(parent, shutdown.clone());
    }
    let reload_cli = cli.clone();
    check_secrets(&cli.command, &settings)?;
    // Traces, when an OTLP receiver is set: each long-running role sends
    // its spans there as its own service.
    let service = match cli.command {
        Command::Gateway(_) => Some("shoal-gateway"),
        Command::Serve(_) => Some("shoal-serve"),
        Command::Worker(_) => Some("shoal-worker"),
        Command::Sandbox(_) => Some("shoal-sandbox"),
        _ => None,
    };
    if let (Some(service), false) = (service, settings.traces.otlp_endpoint.is_empty()) {
        let instance = if settings.instance.is_empty() {
            format!("{service}-{}", std::process::id())
        } else {
            settings.instance.clone()
        };
        shoal_core::spans::install(&settings.traces.otlp_endpoint, service, &instance)
            .map_err(anyhow::Error::msg)?;
        tracing::info!(endpoint = %settings.traces.otlp_endpoint, service, "sending traces");
    }
    match cli.command {
        Command::Up(_) => return crate::up::run(cli.config.clone(), settings, shutdown).await,
        Command::Gateway(_) => {
            // SIGHUP and POST /_gateway/admin/reload rebuild the settings
            // the way this start did: file, environment, then these flags.
            let loader: shoal_gateway::SettingsLoader = Arc::new(move || {
                reload_cli
                    .settings()
                    .map(|s| s.gateway)
                    .map_err(|e| e.to_string())
            });
            let gateway = shoal_gateway::Gateway::bind(settings.gateway.clone())
                .await
                .context("starting the gateway")?
                .with_settings_loader(loader);
            tracing::info!(addr = %gateway.local_addr(), "gateway listening");
            gateway.run(shutdown).await?;
        }
        Command::Serve(_) => {
            let app = Application::build(settings, modules()).await?;
            app.run(shutdown).await?;
        }
        Command::Worker(_) => worker(settings, shutdown).await?,
        Command::Migrate(args) => {
            migrate_all(&settings, args.contract).await?;
            println!(
                "migrations{} applied to {}",
                if args.contract {
                    ", contracting ones too,"
                } else {
                    ""
                },
                shoal_core::settings::redact_url_password(&settings.database_url()?)
            );
        }
        Command::Seed(args) => seed(&settings, args.products, args.stock).await?,
        Command::Jobs(args) => return jobs(&settings, args.command).await,
        Command::Sandbox(_) => sandbox(&settings, shutdown).await?,
        Command::Config
        | Command::Completions { .. }
        | Command::Token { .. }
        | Command::New { .. } => {
            unreachable!("handled before the runtime starts")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses to start a role with a secret everyone knows (the development
/// defaults), unless this is a development run, where each is warned
/// about; and a gateway whose instances register without an admin token
/// to register with. `shoal up` makes random secrets for its children.
fn check_secrets(command: &Command, settings: &Settings) -> anyhow::Result<()> {
    use shoal_core::settings::Role;
    let role = match command {
        Command::Serve(_) => Role::Serve,
        Command::Worker(_) => Role::Worker,
        Command::Sandbox(_) => Role::Sandbox,
        Command::Gateway(args) => {
            if args.registered && settings.gateway.admin_token.is_none() {
                anyhow::bail!(
                    "--registered needs gateway.admin_token: instances register through the \
                     admin API, which is off without a token (set SHOAL_GATEWAY__ADMIN_TOKEN \
                     to a random string of 16 or more characters, and the same on every `serve`)"
                );
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    let known = settings.development_secrets(role);
    if known.is_empty() {
        return Ok(());
    }
    if settings.development {
        for key in &known {
            tracing::warn!(
                key,
                "a development secret is in use (known to everyone); set a random one outside development"
            );
        }
        return Ok(());
    }
    anyhow::bail!(
        "refusing to start with development secrets, which everyone knows: {}. Set each to a \
         random value (the same on every role that shares it, e.g. SHOAL_PAYMENTS__WEBHOOK_SECRET), \
         or pass --development (development = true) for a development run",
        known.join(", ")
    )
}

/// Applies every service's migrations, and those of the session store,
/// bus and job queue.
pub async fn migrate_all(settings: &Settings, contract: bool) -> anyhow::Result<()> {
    let ctx =
        shoal_runtime::app::build_context(settings.clone(), "migrate".into(), &modules()).await?;
    if contract {
        shoal_queue::SqlJobStore::contract(&ctx.db).await?;
    }
    ctx.db.close().await;
    Ok(())
}

/// The worker role: runs every service's job handlers on the configured
/// queues (claimed from the store `queue.backend` names, fed by an outbox
/// relay for NATS), housekeeping (expired sessions, relayed outbox jobs)
/// on a period, and serves `/healthz`, `/readyz` (503 while it cannot
/// claim jobs, or is stopping) and `/metrics` on `worker.listen`.
async fn worker(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let instance: Arc<str> = if settings.instance.is_empty() {
        format!("worker-{}", std::process::id()).into()
    } else {
        settings.instance.clone().into()
    };
    let modules = modules();
    let ctx =
        shoal_runtime::app::build_context(settings.clone(), instance.clone(), &modules).await?;
    let listener = shoal_core::ports::bind_listener(settings.worker.listen)
        .with_context(|| format!("binding {}", settings.worker.listen))?;
    let addr = listener.local_addr()?;
    let lease = Duration::from_millis(settings.worker.lease_ms);
    let backend =
        shoal_runtime::jobs::JobBackend::connect(&ctx, &settings.worker.queues, lease).await?;
    let metrics_token = settings.metrics.token.clone();
    let ready = {
        let (ctx, backend, shutdown) = (ctx.clone(), backend.clone(), shutdown.clone());
        move || {
            let (ctx, backend, shutdown) = (ctx.clone(), backend.clone(), shutdown.clone());
            async move {
                let not_ready = if shutdown.is_cancelled() {
                    Err("the worker is stopping")
                } else {
                    backend.ready(&ctx, Duration::from_secs(1)).await
                };
                match not_ready {
                    Ok(()) => axum::Json(serde_json::json!({"status": "ready"})).into_response(),
                    Err(why) => shoal_runtime::error::problem_response(
                        &shoal_core::Problem::unavailable(format!("not ready: {why}"), 1),
                    ),
                }
            }
        }
    };
    let options = WorkerOptions {
        worker_id: instance.to_string(),
        // The queues bound to HTTP endpoints too, each with its own
        // concurrency.
        queues: settings
            .worker
            .queues
            .iter()
            .filter(|q| !settings.worker.push.iter().any(|p| &p.queue == *q))
            .map(|q| (q.clone(), settings.worker.concurrency))
            .chain(
                settings
                    .worker
                    .push
                    .iter()
                    .map(|p| (p.queue.clone(), p.concurrency)),
            )
            .collect(),
        shutdown_timeout: Duration::from_secs(settings.worker.shutdown_timeout_secs),
        lease,
        ..WorkerOptions::default()
    };
    backend.spawn_relay(shutdown.clone());
    let mut jobs = Worker::new(backend.store.clone(), options);
    for module in &modules {
        jobs = module.register_jobs(&ctx, jobs);
    }
    for (i, push) in settings.worker.push.iter().enumerate() {
        let handler = shoal_runtime::push::PushHandler::new(&push.url, &push.secret)
            .map_err(|e| anyhow::anyhow!("worker.push[{i}].url: {e}"))?;
        let options = shoal_queue::KindOptions {
            rate_limit: (push.rate_per_sec > 0.0).then_some(shoal_queue::RateLimit {
                per_second: push.rate_per_sec,
                burst: 1,
            }),
            ..Default::default()
        };
        jobs = jobs.register_queue(&push.queue, handler, options);
        tracing::info!(queue = %push.queue, url = %push.url, concurrency = push.concurrency, "queue delivered by push");
    }
    let progress = jobs.progress();
    let admin_token: Option<Arc<str>> = settings.gateway.admin_token.as_deref().map(Arc::from);
    let worker_id: Arc<str> = Arc::from(jobs.worker_id());
    let router = axum::Router::new()
        .route(
            "/healthz",
            get(|| async {
                axum::Json(serde_json::json!({"status": "ok", "pid": std::process::id()}))
            }),
        )
        .route("/readyz", get(ready))
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| async move {
                shoal_runtime::app::metrics_response(metrics_token.as_deref(), &headers)
            }),
        )
        // The console's row for this worker (admin token): totals,
        // handlers in flight, run times of the last minute.
        .route(
            "/_shoal/worker",
            get(move |headers: axum::http::HeaderMap| {
                let live = progress.live();
                let token = admin_token.clone();
                let id = worker_id.clone();
                async move {
                    if let Err(denied) =
                        shoal_runtime::jobs_console::check_admin(token.as_deref(), &headers)
                    {
                        return denied;
                    }
                    let mut v = serde_json::to_value(live).unwrap_or_default();
                    v["worker_id"] = (*id).into();
                    v["pid"] = std::process::id().into();
                    axum::Json(v).into_response()
                }
            }),
        )
        // The console's queue pages, through the gateway (`jobs_console`).
        .merge(shoal_runtime::jobs_console::router(
            backend.store.clone(),
            jobs.schedules(),
            settings.gateway.admin_token.as_deref(),
        ));
    let stop = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });
    let jobs = tokio::spawn(jobs.run(shutdown.clone()));
    tracing::info!(%addr, queues = ?settings.worker.queues, backend = ?settings.queue.backend, "worker started");
    let interval = Duration::from_secs(settings.worker.housekeeping_interval_secs.max(1));
    loop {
        match ctx.sessions.prune_expired().await {
            Ok(n) if n > 0 => tracing::info!(removed = n, "expired sessions pruned"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "session pruning failed; will retry"),
        }
        // With NATS the database holds only the outbox: the worker prunes
        // the store it claims from; the outbox's relayed jobs go here.
        if settings.queue.backend == shoal_core::settings::QueueBackend::Nats {
            let day = Duration::from_secs(24 * 3600);
            if let Err(e) = ctx.jobs.prune(day, 7 * day).await {
                tracing::warn!(error = %e, "outbox pruning failed; will retry");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
    let report = jobs.await.context("job worker task")?;
    tracing::info!(?report, "jobs stopped");
    let _ = server.await;
    ctx.db.close().await;
    tracing::info!("worker stopped");
    Ok(())
}

async fn seed(settings: &Settings, products: usize, stock: Option<i64>) -> anyhow::Result<()> {
    let db = shoal_backends::Database::connect(
        &settings.database_url()?,
        settings.database.max_connections,
        Duration::from_millis(settings.database.acquire_timeout_ms),
    )
    .await?;
    let started = std::time::Instant::now();
    let width = 40usize;
    shoal_catalog::seed(&db, products, |done| {
        let filled = (done * width)
            .checked_div(products)
            .unwrap_or(width)
            .min(width);
        eprint!(
            "\r  [{}{}] {done}/{products} products",
            "#".repeat(filled),
            " ".repeat(width - filled)
        );
    })
    .await?;
    eprintln!();
    println!(
        "seeded {products} products in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Some(stock) = stock {
        let n = shoal_catalog::set_all_stock(&db, stock).await?;
        println!("set the stock of {n} products to {stock}");
    }
    db.close().await;
    Ok(())
}

async fn sandbox(settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let url = format!(
        "sqlite://{}?mode=rwc",
        settings.data_dir.join("sandbox.db").display()
    );
    let db = shoal_backends::Database::connect(&url, 4, Duration::from_secs(5)).await?;
    let sandbox = shoal_sandbox::Sandbox::bind(settings.sandbox.clone(), db).await?;
    sandbox.run(shutdown).await
}

/// The job store `shoal jobs` inspects: the one workers claim from.
async fn job_store(settings: &Settings) -> anyhow::Result<Arc<dyn JobStore>> {
    if settings.queue.backend == shoal_core::settings::QueueBackend::Nats {
        let url = settings
            .queue
            .nats_url
            .as_deref()
            .context("queue.nats_url is required for the nats queue backend")?;
        return Ok(Arc::new(
            shoal_runtime::jobs::connect_nats(
                url,
                &settings.queue.nats_prefix,
                Duration::from_millis(settings.worker.lease_ms),
            )
            .await?,
        ));
    }
    let db = shoal_backends::Database::connect(
        &settings.database_url()?,
        settings.database.max_connections,
        Duration::from_millis(settings.database.acquire_timeout_ms),
    )
    .await?;
    Ok(Arc::new(
        shoal_queue::SqlJobStore::open(db, &settings.database_url()?).await?,
    ))
}

async fn jobs(settings: &Settings, command: JobsCommand) -> anyhow::Result<ExitCode> {
    match command {
        JobsCommand::Bench {
            backend,
            jobs,
            concurrency,
            nats_url,
            push,
            push_secret,
            json,
        } => {
            let store: Arc<dyn JobStore> = if backend == "nats" {
                let options = shoal_queue::NatsJobStoreOptions {
                    prefix: format!("bench{}", &shoal_core::ids::new_id()[24..]),
                    ..Default::default()
                };
                Arc::new(
                    shoal_queue::NatsJobStore::connect(&nats_url, options)
                        .await
                        .with_context(|| format!("connecting to NATS at {nats_url}"))?,
                )
            } else {
                job_store(settings).await?
            };
            if !json {
                eprintln!("benchmarking {backend}: {jobs} jobs, concurrency {concurrency} ...");
            }
            let via = match &push {
                Some(url) => Some(
                    shoal_runtime::push::PushHandler::new(url, &push_secret)
                        .map_err(|e| anyhow::anyhow!("--push: {e}"))?,
                ),
                None => None,
            };
            let report = shoal_queue::bench_via(store, jobs, concurrency, via).await;
            let peer = match push {
                Some(_) => format!("shoal/{backend}+push"),
                None => format!("shoal/{backend}"),
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "peer": peer,
                        "jobs": report.jobs,
                        "concurrency": report.concurrency,
                        "enqueue_per_sec": report.enqueue_per_sec,
                        "complete_per_sec": report.complete_per_sec,
                        "start_latency_p50_ms": report.p50_enqueue_to_start_ms,
                        "start_latency_p99_ms": report.p99_enqueue_to_start_ms,
                        "latency_samples": report.latency_samples,
                    })
                );
            } else {
                println!("{report}");
            }
        }
        JobsCommand::List {
            queue,
            state,
            kind,
            limit,
            json,
        } => {
            let state = match state {
                Some(s) => Some(JobState::parse(&s).with_context(|| {
                    format!("unknown state `{s}` (scheduled, available, running, retrying, succeeded, dead, cancelled)")
                })?),
                None => None,
            };
            let store = job_store(settings).await?;
            let jobs = store
                .list(&JobFilter {
                    queue,
                    state,
                    kind,
                    limit: Some(limit),
                })
                .await?;
            if json {
                println!("{}", serde_json::json!({ "jobs": jobs }));
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<36}  {:<10}  {:<18}  {:<9}  {:>8}",
                "ID", "QUEUE", "KIND", "STATE", "ATTEMPTS"
            );
            for j in jobs {
                println!(
                    "{:<36}  {:<10}  {:<18}  {:<9}  {:>4}/{:<3}",
                    j.id,
                    j.queue,
                    j.kind,
                    j.state.as_str(),
                    j.attempts,
                    j.max_attempts
                );
            }
        }
        JobsCommand::Show { id, json } => {
            let store = job_store(settings).await?;
            match store.get(&id).await? {
                Some(job) if json => println!("{}", serde_json::to_string(&job)?),
                Some(job) => print!("{}", describe_job(&job)),
                None => {
                    eprintln!("shoal: no job `{id}`");
                    return Ok(ExitCode::from(1));
                }
            }
        }
        JobsCommand::Retry { id } => {
            let store = job_store(settings).await?;
            return Ok(done(
                store.retry_dead(&id).await?,
                &format!("job {id} is back in its queue"),
                &format!("job `{id}` is not dead (only dead jobs can be retried)"),
            ));
        }
        JobsCommand::Discard { id } => {
            let store = job_store(settings).await?;
            return Ok(done(
                store.discard_dead(&id).await?,
                &format!("job {id} discarded"),
                &format!("job `{id}` is not dead (only dead jobs can be discarded)"),
            ));
        }
        JobsCommand::Cancel { id } => {
            let store = job_store(settings).await?;
            return Ok(done(
                store.cancel(&id).await?,
                &format!("job {id} cancelled"),
                &format!("job `{id}` is unknown or already finished"),
            ));
        }
        JobsCommand::Stats { json } => {
            let store = job_store(settings).await?;
            let stats = store.stats().await?;
            if json {
                println!("{}", serde_json::json!({ "queues": stats }));
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<12} {:>7} {:>10} {:>9} {:>9} {:>8} {:>8} {:>10} {:>6}",
                "QUEUE",
                "DEPTH",
                "OLDEST_MS",
                "SCHEDULED",
                "AVAILABLE",
                "RUNNING",
                "RETRYING",
                "SUCCEEDED",
                "DEAD"
            );
            for q in stats {
                println!(
                    "{:<12} {:>7} {:>10} {:>9} {:>9} {:>8} {:>8} {:>10} {:>6}",
                    q.queue,
                    q.depth,
                    q.oldest_age_ms,
                    q.scheduled,
                    q.available,
                    q.running,
                    q.retrying,
                    q.succeeded,
                    q.dead
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `shoal jobs show`: a job as a person reads it.
fn describe_job(job: &shoal_queue::Job) -> String {
    let time = |ms: Option<i64>| {
        ms.and_then(|ms| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
        })
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into())
    };
    let mut out = format!(
        "job       {}\nqueue     {}\nkind      {}\nstate     {}\nattempts  {} of {}\ncreated   {}\nrun at    {}\nstarted   {}\nfinished  {}\n",
        job.id,
        job.queue,
        job.kind,
        job.state.as_str(),
        job.attempts,
        job.max_attempts,
        time(Some(job.created_at)),
        time(Some(job.run_at)),
        time(job.started_at),
        time(job.finished_at),
    );
    if let Some(key) = &job.unique_key {
        out.push_str(&format!("unique    {key}\n"));
    }
    out.push_str(&format!("payload   {}\n", job.payload));
    for e in &job.errors {
        out.push_str(&format!("error     attempt {}: {}\n", e.attempt, e.error));
    }
    out
}

fn done(ok: bool, yes: &str, no: &str) -> ExitCode {
    if ok {
        println!("{yes}");
        ExitCode::SUCCESS
    } else {
        eprintln!("shoal: {no}");
        ExitCode::from(1)
    }
}
