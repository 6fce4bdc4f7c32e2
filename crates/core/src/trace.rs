//! The trace id of the work in hand, carried across the hops of one piece
//! of work: the runtime sets it to the request id for the whole request;
//! jobs enqueued while it is set record it (`trace_id`), and the worker
//! sets it again while their handler runs, so jobs enqueued from a job,
//! calls to other services (`x-request-id`) and every log line of the
//! chain carry the id of the request that started it.

use std::future::Future;
use std::sync::Arc;

tokio::task_local! {
    static TRACE_ID: Arc<str>;
}

/// The trace id of the current task, when one is set.
pub fn current() -> Option<String> {
    TRACE_ID.try_with(|t| t.to_string()).ok()
}

/// Runs `f` with `id` as its trace id. A plain function, not an `async
/// fn`, for the reason `spans::within` gives.
pub fn scope<F: Future>(id: impl Into<Arc<str>>, f: F) -> impl Future<Output = F::Output> {
    TRACE_ID.scope(id.into(), f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scoped_ids_nest_and_end_with_their_scope() {
        assert_eq!(current(), None);
        scope("outer", async {
            assert_eq!(current().as_deref(), Some("outer"));
            scope("inner", async {
                assert_eq!(current().as_deref(), Some("inner"))
            })
            .await;
            assert_eq!(current().as_deref(), Some("outer"));
        })
        .await;
        assert_eq!(current(), None);
    }
}
