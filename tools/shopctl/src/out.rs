//! Output that never panics: `println!` panics when stdout is a closed pipe
//! (`shopctl … | head`) or a hung-up terminal, which would also skip the
//! stack's clean shutdown. These macros drop what cannot be written.

/// `println!` to stdout, ignoring write errors (EPIPE, EIO).
macro_rules! out {
    () => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout());
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` to stderr, ignoring write errors.
macro_rules! eout {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
