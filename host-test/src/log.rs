//! One line per event on stderr.
//!
//! Deliberately tiny: the host must never log secrets, and keeping every log statement a plain
//! format string at the call site makes what is logged easy to review.

/// Writes one event line to stderr, prefixed so it is easy to grep out of mixed output.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::write(format_args!($($arg)*))
    };
}

/// Whether each call's own line (`tenant=… call=… ok ms=…`) is written: `IMBRIDGE_QUIET`
/// turns that one off for benchmarks and demos, never the other events (failed deliveries,
/// slow commits, lease changes), which an operator must see.
pub fn per_call() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("IMBRIDGE_QUIET").is_none())
}

#[doc(hidden)]
pub fn write(args: std::fmt::Arguments<'_>) {
    let now = crate::clock::system_now();
    // Errors can carry multi-line wasm backtraces; one event must stay one line.
    let text = args.to_string();
    let line: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    eprintln!(
        "imbridge-host {}.{:03} {}",
        now.as_secs(),
        now.subsec_millis(),
        line.join(" | ")
    );
}
