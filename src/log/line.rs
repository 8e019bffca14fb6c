//! The operator log's lines read like the access log's where a log shipper looks: the same
//! timestamp (RFC 3339, milliseconds, UTC) under the same JSON key, `timestamp`, and a `log`
//! field saying which log a line is from (`app` here, `access` there), since both may share
//! stderr.

use std::fmt;

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The access log's timestamp format.
pub(super) struct Millis;

impl FormatTime for Millis {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let mut out = Vec::with_capacity(24);
        crate::text::timestamp(&mut out);
        w.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

/// A JSON event format whose objects say `"log":"app"` right after the timestamp.
pub(super) struct Tagged<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for Tagged<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let mut line = String::with_capacity(256);
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        const KEY: &str = "{\"timestamp\":\"";
        let after = line.strip_prefix(KEY).and_then(|rest| rest.find("\",")).map(|end| KEY.len() + end + 2);
        match after {
            Some(at) => {
                writer.write_str(&line[..at])?;
                writer.write_str("\"log\":\"app\",")?;
                writer.write_str(&line[at..])
            }
            None => writer.write_str(&line),
        }
    }
}
