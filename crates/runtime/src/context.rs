//! `AppContext`: what every handler of every service can reach (settings,
//! the database, the session store, the broadcast bus, the query cache,
//! the draining flag). Cheap to clone.

use crate::cache::QueryCache;
use shoal_backends::{BlobStore, Broadcast, Database, SessionLifetimes, SessionStore};
use shoal_core::Settings;
use shoal_queue::SqlJobStore;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What every handler and middleware of an instance shares. One `Arc`:
/// axum clones the state for every layer and extractor of every request,
/// and one reference count to bump (instead of one per field, contended
/// between the runtime's threads) is what keeps that cheap (`bench/README.md`
/// "Profile of the service path").
#[derive(Clone, Debug)]
pub struct AppContext(Arc<Shared>);

/// The fields of an [`AppContext`] (reached through `Deref`).
#[derive(Debug)]
pub struct Shared {
    pub settings: Arc<Settings>,
    pub db: Database,
    pub sessions: Arc<dyn SessionStore>,
    /// The bus between instances (invalidations, later notifications).
    pub bus: Arc<dyn Broadcast>,
    /// The two-tier query cache shared by this instance's services.
    pub cache: QueryCache,
    /// The job queue, in the main database (enqueue inside a transaction
    /// with `jobs.enqueue_in_transaction`).
    pub jobs: Arc<SqlJobStore>,
    /// Blob storage (local folder or S3).
    pub blobs: BlobStore,
    /// This process's name in logs and the `x-shoal-instance` header.
    pub instance: Arc<str>,
    draining: AtomicBool,
}

impl std::ops::Deref for AppContext {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Arc<Settings>,
        db: Database,
        sessions: Arc<dyn SessionStore>,
        bus: Arc<dyn Broadcast>,
        cache: QueryCache,
        jobs: Arc<SqlJobStore>,
        blobs: BlobStore,
        instance: Arc<str>,
    ) -> Self {
        AppContext(Arc::new(Shared {
            settings,
            db,
            sessions,
            bus,
            cache,
            jobs,
            blobs,
            instance,
            draining: AtomicBool::new(false),
        }))
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The session lifetimes from settings.
    pub fn session_lifetimes(&self) -> SessionLifetimes {
        SessionLifetimes {
            idle: Duration::from_secs(self.settings.sessions.idle_timeout_secs),
            absolute: Duration::from_secs(self.settings.sessions.absolute_timeout_secs),
        }
    }
}
