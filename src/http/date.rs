//! The `Date` header value (RFC 9110 §5.6.7 IMF-fixdate), rendered once per second, not per response.

use std::time::{SystemTime, UNIX_EPOCH};

/// Length of an IMF-fixdate such as `Sun, 06 Nov 1994 08:49:37 GMT`.
pub const DATE_LEN: usize = 29;

/// Caches the rendered date for the current second.
#[derive(Clone)]
pub struct DateCache {
    second: u64,
    rendered: [u8; DATE_LEN],
}

impl DateCache {
    /// A cache rendered for `now`.
    pub fn new(now: SystemTime) -> DateCache {
        let mut cache = DateCache {
            second: u64::MAX,
            rendered: [b' '; DATE_LEN],
        };
        cache.update(now);
        cache
    }

    /// Re-renders the date if `now` falls in a new second; cheap otherwise.
    pub fn update(&mut self, now: SystemTime) {
        let second = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if second != self.second {
            self.second = second;
            self.rendered = render(second);
        }
    }

    /// The header value for the current second.
    pub fn value(&self) -> &[u8] {
        &self.rendered
    }
}

/// Renders seconds since the Unix epoch as an IMF-fixdate.
fn render(secs: u64) -> [u8; DATE_LEN] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let weekday = DAYS.get((days % 7) as usize).copied().unwrap_or(b"Thu");
    let month_name = MONTHS
        .get(month.saturating_sub(1) as usize)
        .copied()
        .unwrap_or(b"Jan");

    let mut out = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    let digits = |n: u64| b'0' + (n % 10) as u8;
    out[..3].copy_from_slice(weekday);
    out[5] = digits(day / 10);
    out[6] = digits(day);
    out[8..11].copy_from_slice(month_name);
    out[12] = digits(year / 1000);
    out[13] = digits(year / 100);
    out[14] = digits(year / 10);
    out[15] = digits(year);
    out[17] = digits(rem / 36_000);
    out[18] = digits(rem / 3_600);
    out[20] = digits(rem % 3_600 / 600);
    out[21] = digits(rem % 3_600 / 60);
    out[23] = digits(rem % 60 / 10);
    out[24] = digits(rem % 60);
    out
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 -> (year, month 1..=12, day 1..=31).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> String {
        let cache = DateCache::new(UNIX_EPOCH + Duration::from_secs(secs));
        String::from_utf8(cache.value().to_vec()).unwrap()
    }

    #[test]
    fn renders_imf_fixdate() {
        assert_eq!(at(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(at(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(at(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(at(1_798_761_599), "Thu, 31 Dec 2026 23:59:59 GMT");
    }

    #[test]
    fn re_renders_only_when_the_second_changes() {
        let mut cache = DateCache::new(UNIX_EPOCH + Duration::from_millis(1_000));
        cache.update(UNIX_EPOCH + Duration::from_millis(1_999));
        assert_eq!(cache.value(), b"Thu, 01 Jan 1970 00:00:01 GMT");
        cache.update(UNIX_EPOCH + Duration::from_millis(2_000));
        assert_eq!(cache.value(), b"Thu, 01 Jan 1970 00:00:02 GMT");
    }
}
