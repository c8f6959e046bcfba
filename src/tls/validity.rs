//! A certificate's validity period (notBefore, notAfter), read from its DER, so that an expired
//! certificate is refused at start instead of being served to browsers that refuse it.
//!
//! Why by hand: rustls and webpki check validity only while verifying a chain up to a trust
//! anchor, which a server does not have for its own certificate, and a full X.509 parser
//! (x509-parser) brings a dozen crates for two dates. This walks the certificate's outer DER
//! structure to the `validity` field and nothing else; anything unexpected is `None`.

const SEQUENCE: u8 = 0x30;
/// `[0] EXPLICIT Version`, present in every v2/v3 certificate.
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
/// Fields of `TBSCertificate` before `validity` (after the optional version): serial number,
/// signature algorithm, issuer.
const FIELDS_BEFORE_VALIDITY: usize = 3;

/// (notBefore, notAfter) in seconds since the Unix epoch.
pub fn of(cert: &[u8]) -> Option<(i64, i64)> {
    let (SEQUENCE, cert, _) = element(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = element(cert)? else {
        return None;
    };
    let mut fields = match element(tbs)? {
        (VERSION, _, rest) => rest,
        _ => tbs,
    };
    for _ in 0..FIELDS_BEFORE_VALIDITY {
        fields = element(fields)?.2;
    }
    let (SEQUENCE, validity, _) = element(fields)? else {
        return None;
    };
    let (tag, not_before, rest) = element(validity)?;
    let not_before = time(tag, not_before)?;
    let (tag, not_after, _) = element(rest)?;
    Some((not_before, time(tag, not_after)?))
}

/// One DER element: its tag, its contents, and what follows it.
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// A UTCTime (`YYMMDDHHMMSSZ`, 1950-2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn time(tag: u8, text: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match (tag, text.len()) {
        (UTC_TIME, 12) => {
            let yy: i64 = text[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        (GENERALIZED_TIME, 14) => (text[..4].parse().ok()?, &text[4..]),
        _ => return None,
    };
    let two = |i: usize| rest.get(i..i + 2)?.parse::<i64>().ok();
    let (month, day) = (two(0)?, two(2)?);
    let seconds = two(4)? * 3600 + two(6)? * 60 + two(8)?;
    Some(days_since_epoch(year, month, day) * 86_400 + seconds)
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar: count whole 400-year
/// eras (146,097 days each) from a year that starts in March, so the leap day falls last.
fn days_since_epoch(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    // 719,468 days from 0000-03-01 to 1970-01-01.
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_count_from_the_epoch() {
        assert_eq!(days_since_epoch(1970, 1, 1), 0);
        assert_eq!(days_since_epoch(2000, 3, 1), 11_017);
        assert_eq!(days_since_epoch(2024, 2, 29), 19_782);
        assert_eq!(time(UTC_TIME, b"700101000001Z"), Some(1));
        assert_eq!(
            time(GENERALIZED_TIME, b"20000301000000Z"),
            Some(11_017 * 86_400)
        );
        assert_eq!(time(UTC_TIME, b"7001010000+1Z"), None);
    }

    #[test]
    fn garbage_has_no_validity() {
        assert_eq!(of(b""), None);
        assert_eq!(of(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(of(&[0x30, 0x03, 0x30, 0x01, 0x00]), None);
    }
}
