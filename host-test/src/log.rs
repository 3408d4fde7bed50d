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

#[doc(hidden)]
pub fn write(args: std::fmt::Arguments<'_>) {
    if std::env::var_os("IMBRIDGE_QUIET").is_some() {
        return;
    }
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
