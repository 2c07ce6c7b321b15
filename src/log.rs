//! The slog root logger: human-readable (slog-term) or one JSON object per line (slog-json,
//! with `msg`, `level` spelled out as INFO/WARNING/ERROR/CRITICAL/DEBUG, and an RFC 3339 `ts`),
//! both on stderr, line-buffered so a line is never split across writes.

use std::io::LineWriter;
use std::sync::Mutex;

use slog::{Drain, FnValue, Level, LevelFilter, Logger, PushFnValue, Record, o};
use time::format_description::well_known::Rfc3339;

use crate::config::{LogFormat, LogLevel};

/// Builds the root logger for a format and level.
pub fn root(format: LogFormat, level: LogLevel) -> Logger {
    let level = match level {
        LogLevel::Debug => Level::Debug,
        LogLevel::Info => Level::Info,
        LogLevel::Warning => Level::Warning,
        LogLevel::Error => Level::Error,
    };
    let stderr = || LineWriter::new(std::io::stderr());
    match format {
        LogFormat::Json => {
            // slog-json's default keys spell levels short ("ERRO"); operators grep for ERROR.
            let drain = slog_json::Json::new(stderr())
                .set_newlines(true)
                .add_key_value(o!(
                    "ts" => FnValue(|_: &Record| {
                        time::OffsetDateTime::now_utc().format(&Rfc3339).ok()
                    }),
                    "level" => FnValue(|record: &Record| record.level().as_str()),
                    "msg" => PushFnValue(|record: &Record, serializer| serializer.emit(record.msg())),
                ))
                .build();
            finish(drain, level)
        }
        LogFormat::Term => {
            let decorator = slog_term::PlainSyncDecorator::new(stderr());
            let drain = slog_term::FullFormat::new(decorator).build();
            finish(drain, level)
        }
    }
}

/// Wraps a drain for the single-threaded loop: a mutex makes it `Sync` (it is never contended),
/// errors writing to stderr are dropped rather than crashing the server.
fn finish<D>(drain: D, level: Level) -> Logger
where
    D: Drain + Send + 'static,
    D::Err: std::fmt::Debug,
{
    let drain = slog::IgnoreResult::new(Mutex::new(drain));
    Logger::root(LevelFilter::new(drain, level).fuse(), o!())
}
