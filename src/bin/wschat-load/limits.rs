//! The server's limits as the tool meets them: which failures are a limit of the server refusing
//! the load (rather than a fault), what each is called in one line, and which server flags lift
//! it. It reads the tallies the modes keep; it never decides whether a run is ok.

use crate::stats::Tally;

/// How to lift the chat rate limits (messages and bytes, per connection, address and room), for
/// every line that names them.
const RATE_FLAGS: &str = "server flags --rate/--burst, --rate-bytes, --rate-bytes-per-ip, \
                          --room-rate-bytes, or run the server with --load-test";

/// Said after a 503 whose body names no flag (the server's limits on handshakes in progress).
const DOOR_HINT: &str = "the server's own reason; a lower --concurrency opens fewer at once";

/// The error code of a message refused by the server's rate limit.
pub const RATE_LIMITED: &str = "rate_limited";

/// One line naming the limit behind a tally entry (an error, close or server error kind), or
/// `None` when the entry is not a limit of the server.
pub fn name(kind: &str) -> Option<String> {
    if kind.ends_with(RATE_LIMITED) {
        return Some(format!("refused by the server's rate limit ({RATE_FLAGS})"));
    }
    if kind.contains("1008 flooding") {
        return Some(format!(
            "closed by the server for flooding: its rate limit refused too many ({RATE_FLAGS})"
        ));
    }
    if kind.contains("1008 too slow") {
        return Some(
            "dropped by the server as too slow: the tool read too slowly for the server's \
             queue (server flags --client-queue, --client-queue-bytes)"
                .into(),
        );
    }
    if kind == "too_many_rooms" {
        return Some("refused by the server's room limit (server flag --max-rooms)".into());
    }
    let at = kind.find("http 503")?;
    let refusal = &kind[at..];
    Some(if refusal.contains("-per-ip") {
        // A per-address limit, which --load-test lifts.
        format!("refused at connect: {refusal} (or run the server with --load-test)")
    } else if refusal.contains("--") {
        format!("refused at connect: {refusal}")
    } else {
        format!("refused at connect: {refusal} ({DOOR_HINT})")
    })
}

/// The first limit found in `tallies` (in the order given), as one line.
pub fn first(tallies: &[&Tally]) -> Option<String> {
    tallies
        .iter()
        .flat_map(|t| t.0.keys())
        .find_map(|kind| name(kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_named_with_the_flags_that_lift_them() {
        let rate = name("rate_limited").unwrap();
        assert!(
            rate.contains("rate limit") && rate.contains("--load-test"),
            "{rate}"
        );
        assert!(name("1008 flooding").unwrap().contains("--rate/--burst"));
        let door = name("handshake: http 503: too many connections waiting at the door").unwrap();
        assert!(door.contains("--concurrency"), "{door}");
        let named = "handshake: http 503: per-address cap (--max-clients-per-ip)";
        assert_eq!(
            name(named).unwrap(),
            "refused at connect: http 503: per-address cap (--max-clients-per-ip) \
             (or run the server with --load-test)"
        );
        let total = "handshake: http 503: server full: 5 WebSocket clients (--max-clients)";
        let total = name(total).unwrap();
        assert!(total.ends_with("(--max-clients)"), "{total}");
        assert_eq!(name("connect: refused"), None);
        assert_eq!(name("1001 server shutting down"), None);
    }

    #[test]
    fn first_takes_the_tallies_in_order() {
        let (mut closes, mut errors) = (Tally::default(), Tally::default());
        errors.add("rate_limited");
        assert_eq!(first(&[&closes]), None);
        closes.add("1008 flooding");
        let got = first(&[&closes, &errors]).unwrap();
        assert!(
            got.starts_with("closed by the server for flooding"),
            "{got}"
        );
    }
}
