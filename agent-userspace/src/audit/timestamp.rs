//! The text of `@timestamp` and the other time fields, written digit by digit: every
//! record has one, and a general-purpose format description costs several times more.

use time::{OffsetDateTime, UtcOffset};

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (RFC 3339, UTC, microseconds); `None` outside the years
/// 0000-9999.
#[cfg(test)]
fn rfc3339_micros(t: OffsetDateTime) -> Option<String> {
    rfc3339_micros_text(t).map(|text| String::from_utf8_lossy(&text).into_owned())
}

/// The bytes of [`rfc3339_micros`]' text (ASCII), without allocating.
pub(super) fn rfc3339_micros_text(t: OffsetDateTime) -> Option<[u8; 27]> {
    let utc = t.to_offset(UtcOffset::UTC);
    let year = u32::try_from(utc.year()).ok().filter(|y| *y <= 9999)?;
    let (hour, minute, second, micro) = utc.to_hms_micro();
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    digits(&mut out[0..4], year);
    digits(&mut out[5..7], u32::from(u8::from(utc.month())));
    digits(&mut out[8..10], u32::from(utc.day()));
    digits(&mut out[11..13], u32::from(hour));
    digits(&mut out[14..16], u32::from(minute));
    digits(&mut out[17..19], u32::from(second));
    digits(&mut out[20..26], micro);
    Some(out)
}

/// Writes `value` in decimal into `out`, right-aligned and zero-padded (the caller sizes
/// `out` for the value's range).
fn digits(out: &mut [u8], mut value: u32) {
    for b in out.iter_mut().rev() {
        *b = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]
mod tests {
    use time::{format_description::well_known::Rfc3339, macros::format_description};

    use super::*;

    #[test]
    fn same_text_as_the_format_description() {
        let reference = format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        let mut ns: i128 = -62_167_219_200_000_000_000; // 0000-01-01T00:00:00Z
        let end: i128 = 253_402_300_799_999_999_999; // 9999-12-31T23:59:59.999999999Z
        let step: i128 = 7_777_777_777_777_777; // about 90 days, odd digits everywhere
        while ns <= end {
            let t = OffsetDateTime::from_unix_timestamp_nanos(ns).unwrap();
            assert_eq!(
                rfc3339_micros(t).unwrap(),
                t.format(reference).unwrap(),
                "at {ns} ns"
            );
            ns += step;
        }
        let last = OffsetDateTime::from_unix_timestamp_nanos(end).unwrap();
        assert_eq!(rfc3339_micros(last).unwrap(), "9999-12-31T23:59:59.999999Z");
    }

    #[test]
    fn other_offsets_are_written_in_utc() {
        let t = OffsetDateTime::parse("2026-12-03T01:02:03.456789+05:30", &Rfc3339).unwrap();
        assert_eq!(rfc3339_micros(t).unwrap(), "2026-12-02T19:32:03.456789Z");
    }

    #[test]
    fn years_before_0_have_no_text() {
        // One second before 0000-01-01T00:00:00Z.
        let t = OffsetDateTime::from_unix_timestamp(-62_167_219_201).unwrap();
        assert_eq!(t.year(), -1);
        assert_eq!(rfc3339_micros(t), None);
    }
}
