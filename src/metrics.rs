//! Prometheus text exposition of [`Stats`](crate::Stats).
