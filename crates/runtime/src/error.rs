//! `ApiError`: the error type handlers return. It renders as RFC 9457
//! problem+json; internal causes are logged with their chain and never
//! shown to the client.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use shoal_core::problem::{Overload, Problem, OVERLOAD_HEADER, PROBLEM_JSON};

#[derive(Debug)]
pub struct ApiError(pub Problem);

impl ApiError {
    /// A 500 whose cause is logged (with its source chain) but not sent.
    pub fn internal(context: &str, err: &(dyn std::error::Error + 'static)) -> Self {
        let mut chain = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        tracing::error!(error = %chain, "{context}");
        ApiError(Problem::internal(
            "the server failed to handle this request; it has been logged",
        ))
    }
}

impl From<Problem> for ApiError {
    fn from(p: Problem) -> Self {
        ApiError(p)
    }
}

impl ApiError {
    /// No database connection came free within the pool's acquire
    /// timeout: the instance is overloaded, not broken. 503 with
    /// `Retry-After`, as for the concurrency limit; the cause is counted
    /// (`shoal_db_pool_timeouts_total`) and logged as a warning.
    fn pool_timed_out() -> Self {
        metrics::counter!("shoal_db_pool_timeouts_total").increment(1);
        tracing::warn!("no database connection came free within database.acquire_timeout_ms");
        ApiError(
            Problem::unavailable(
                "this instance is too busy to reach its database now; retry shortly",
                1,
            )
            .overloaded(Overload::Busy),
        )
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut => ApiError::pool_timed_out(),
            e => ApiError::internal("database error", &e),
        }
    }
}

impl From<shoal_backends::DbError> for ApiError {
    fn from(e: shoal_backends::DbError) -> Self {
        match e {
            shoal_backends::DbError::Sql(sqlx::Error::PoolTimedOut) => ApiError::pool_timed_out(),
            e => ApiError::internal("database error", &e),
        }
    }
}

impl From<shoal_backends::rusqlite::Error> for ApiError {
    fn from(e: shoal_backends::rusqlite::Error) -> Self {
        ApiError::internal("database error", &e)
    }
}

impl From<shoal_backends::SessionError> for ApiError {
    fn from(e: shoal_backends::SessionError) -> Self {
        // A session store in the database, out of connections: the same
        // overload as the handler's own queries.
        if e.is_pool_timeout() {
            return ApiError::pool_timed_out();
        }
        ApiError::internal("session store error", &e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        problem_response(&self.0)
    }
}

/// A problem+json response, with Retry-After when the problem has one.
pub fn problem_response(problem: &Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, problem.to_json()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    if let Some(secs) = problem.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if let Some(why) = problem.overload {
        headers.insert(
            HeaderName::from_static(OVERLOAD_HEADER),
            HeaderValue::from_static(why.as_str()),
        );
    }
    response
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_timeout_is_an_overload_503_with_retry_after_and_other_store_errors_500() {
        for e in [
            ApiError::from(sqlx::Error::PoolTimedOut),
            ApiError::from(shoal_backends::DbError::Sql(sqlx::Error::PoolTimedOut)),
            ApiError::from(shoal_backends::SessionError::Sql(sqlx::Error::PoolTimedOut)),
            ApiError::from(shoal_backends::SessionError::Db(
                shoal_backends::DbError::Sql(sqlx::Error::PoolTimedOut),
            )),
            ApiError::from(shoal_backends::SessionError::Shared(std::sync::Arc::new(
                shoal_backends::SessionError::Sql(sqlx::Error::PoolTimedOut),
            ))),
        ] {
            let r = e.into_response();
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(r.headers()[header::RETRY_AFTER], "1");
            // A gateway may retry it elsewhere, if the request is idempotent.
            assert_eq!(r.headers()[OVERLOAD_HEADER], "busy");
        }
        for e in [
            ApiError::from(sqlx::Error::RowNotFound),
            ApiError::from(shoal_backends::SessionError::Sql(sqlx::Error::RowNotFound)),
        ] {
            let r = e.into_response();
            assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
            assert!(r.headers().get(OVERLOAD_HEADER).is_none());
        }
    }
}
