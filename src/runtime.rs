//! The private tokio runtime each broker sink and source drives its async client with, so that
//! the core stays synchronous and an application needs no runtime of its own.

/// A current-thread runtime with I/O and timers: the sink or source calls `block_on` from the
/// relay's or bridge's own thread, one broker operation at a time.
pub(crate) fn private() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
