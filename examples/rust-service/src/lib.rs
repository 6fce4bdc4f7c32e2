//! The `greetings` service: a Shoal service in its own crate. One route
//! (`POST /api/greetings` for the logged-in user, `GET` to list theirs),
//! one migration (its table), one job (`greetings.send`, enqueued in the
//! same transaction as the row, so both exist or neither does), one
//! setting of its own (`[services.greetings] max_length`).
//! Built into a binary with Shoal's own services by `src/main.rs`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use shoal_backends::{now_millis, Migration};
use shoal_core::settings::{service_section, SettingsError};
use shoal_core::{Problem, Settings};
use shoal_queue::{handler_fn, JobContext, JobError, NewJob, Worker};
use shoal_runtime::error::ApiResult;
use shoal_runtime::openapi::{Api, Op};
use shoal_runtime::{ApiError, ApiJson, AppContext, CurrentSession, ServiceModule};
use std::sync::Arc;

/// The job that sends a greeting.
pub const SEND_KIND: &str = "greetings.send";
/// Its queue (one of `worker.queues`).
pub const QUEUE: &str = "default";

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "greetings",
    sql: "CREATE TABLE IF NOT EXISTS greetings (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        text TEXT NOT NULL,
        sent_at BIGINT,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS greetings_by_user ON greetings (user_id, created_at)",
}];

/// The service module: what Shoal mounts, migrates and runs.
#[derive(Debug, Clone, Default)]
pub struct Greetings;

/// `[services.greetings]` in the settings file, or
/// `SHOAL_SERVICES__GREETINGS__MAX_LENGTH=300` in the environment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GreetingsSettings {
    /// Longest greeting, in characters (1-10000).
    pub max_length: usize,
}

impl Default for GreetingsSettings {
    fn default() -> Self {
        GreetingsSettings { max_length: 200 }
    }
}

impl GreetingsSettings {
    /// This service's section of `settings`, checked.
    pub fn from(settings: &Settings) -> Result<GreetingsSettings, SettingsError> {
        let s: GreetingsSettings = service_section(settings, "greetings")?;
        if !(1..=10_000).contains(&s.max_length) {
            return Err(SettingsError::Invalid {
                key: "services.greetings.max_length".into(),
                message: "must be between 1 and 10000".into(),
            });
        }
        Ok(s)
    }
}

impl ServiceModule for Greetings {
    fn name(&self) -> &'static str {
        "greetings"
    }

    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }

    fn check_settings(&self, settings: &Settings) -> Result<(), SettingsError> {
        GreetingsSettings::from(settings).map(|_| ())
    }

    fn routes(&self, ctx: &AppContext) -> Api {
        let settings = GreetingsSettings::from(&ctx.settings).expect("checked at start");
        Api::new()
            .post(
                "/api/greetings",
                create,
                Op::new("greetings", "Send a greeting")
                    .describe("Stored, and sent in the background by the job greetings.send.")
                    .session()
                    .json_body::<NewGreeting>()
                    .returns::<Greeting>(201, "Stored; sending")
                    .problems(&[401, 422]),
            )
            .get(
                "/api/greetings",
                list,
                Op::new("greetings", "Your greetings, newest first")
                    .session()
                    .returns::<Vec<Greeting>>(200, "Your greetings")
                    .problems(&[401]),
            )
            .layer(Extension(Arc::new(settings)))
    }

    fn register_jobs(&self, ctx: &AppContext, worker: Worker) -> Worker {
        let ctx = ctx.clone();
        worker.register(
            SEND_KIND,
            handler_fn(move |job: JobContext| {
                let ctx = ctx.clone();
                async move { send(&ctx, &job).await }
            }),
        )
    }
}

/// The body of `POST /api/greetings`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewGreeting {
    /// 1 to `max_length` (200) characters.
    pub text: String,
}

/// A stored greeting.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, schemars::JsonSchema)]
pub struct Greeting {
    pub id: String,
    pub user_id: String,
    pub text: String,
    /// When the job sent it (ms since the epoch); null until then.
    pub sent_at: Option<i64>,
    pub created_at: i64,
}

async fn create(
    State(ctx): State<AppContext>,
    Extension(settings): Extension<Arc<GreetingsSettings>>,
    CurrentSession(session): CurrentSession,
    ApiJson(body): ApiJson<NewGreeting>,
) -> ApiResult<(StatusCode, Json<Greeting>)> {
    let text = body.text.trim();
    let max = settings.max_length;
    if text.is_empty() || text.chars().count() > max {
        return Err(
            Problem::validation(format!("text must be 1 to {max} characters"))
                .with_field("text", format!("1 to {max} characters"))
                .into(),
        );
    }
    let greeting = Greeting {
        id: shoal_core::ids::new_id(),
        user_id: session.user_id.clone(),
        text: text.to_string(),
        sent_at: None,
        created_at: now_millis(),
    };
    // The row and its job commit together, or neither does.
    let mut writer = ctx.db.write().await?;
    let mut tx = writer.begin().await?;
    sqlx::query("INSERT INTO greetings (id, user_id, text, created_at) VALUES ($1, $2, $3, $4)")
        .bind(&greeting.id)
        .bind(&greeting.user_id)
        .bind(&greeting.text)
        .bind(greeting.created_at)
        .execute(&mut *tx)
        .await?;
    let job = NewJob::new(QUEUE, SEND_KIND, serde_json::json!({"id": greeting.id}))
        .unique_key(format!("greetings-send:{}", greeting.id));
    ctx.jobs
        .enqueue_in_transaction(&mut tx, job)
        .await
        .map_err(|e| ApiError::internal("enqueueing a greeting", &e))?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(greeting)))
}

async fn list(
    State(ctx): State<AppContext>,
    CurrentSession(session): CurrentSession,
) -> ApiResult<Json<Vec<Greeting>>> {
    let rows = sqlx::query_as::<_, Greeting>(
        "SELECT id, user_id, text, sent_at, created_at FROM greetings
         WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT 100",
    )
    .bind(&session.user_id)
    .fetch_all(ctx.db.pool())
    .await?;
    Ok(Json(rows))
}

/// The job: "sends" the greeting (here, records when) once, however often
/// it runs: a repeat finds `sent_at` set and changes nothing.
async fn send(ctx: &AppContext, job: &JobContext) -> Result<(), JobError> {
    let id = job
        .payload()
        .get("id")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| JobError::permanent("payload has no id"))?;
    let mut writer = ctx.db.write().await.map_err(JobError::retryable)?;
    sqlx::query("UPDATE greetings SET sent_at = $1 WHERE id = $2 AND sent_at IS NULL")
        .bind(now_millis())
        .bind(id)
        .execute(&mut *writer)
        .await
        .map_err(JobError::retryable)?;
    Ok(())
}
