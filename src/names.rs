//! Nicknames: what a valid one is, and when two of them are "the same" name.
//!
//! A name is shown to other people, so it must not be able to pass for someone else's. This module
//! turns what a client typed into the name everyone sees ([`check`]), and gives every name a
//! uniqueness key ([`key`]) under which look-alikes collide: `alice`, `Alice`, `ａｌｉｃｅ` (full
//! width), `𝐚𝐥𝐢𝐜𝐞` (mathematical bold) and `аliсe` (with two Cyrillic letters) all share one key,
//! so only one of them can be online at a time.
//!
//! The rules, in order (docs/PROTOCOL.md, "Names", is the reader's version):
//! 1. The name is put in Unicode normalisation form NFKC, which turns compatibility variants
//!    (full-width, mathematical, ligature, the many spaces) into their plain form.
//! 2. Whitespace at either end is removed, and a run of spaces inside becomes one space (a browser
//!    shows `a  b` as `a b`, so the two must not be different names).
//! 3. Refused: any character of the general categories "other" (control, format, private use,
//!    unassigned: U+200B, U+202E, U+FEFF, the soft hyphen, ...), a default-ignorable character
//!    (U+3164 HANGUL FILLER, variation selectors, ...), any separator but the plain space (U+2028,
//!    U+1680), and a word that starts with a combining mark.
//! 4. 1 to [`MAX_NAME_CHARS`] characters remain.
//! 5. Reserved for the server: `server` (the HTTP API's sender) and `guest-<digits>` (the names
//!    the server hands out), and every name whose key equals theirs.
//!
//! Mixed scripts in one name (Latin and Cyrillic, say) are allowed: the key already makes a
//! look-alike collide with the name it imitates, and a refusal would also hit honest names written
//! in two scripts (`Anna Иванова`). Emoji are allowed as single characters; sequences joined by
//! U+200D or carrying a variation selector are not, since those are the invisible characters
//! rule 3 refuses.
//!
//! This module never knows who is online: the dispatcher keeps the map from keys to clients.

use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};
use unicode_security::GeneralSecurityProfile;
use unicode_security::general_security_profile::IdentifierType;

/// Longest nickname, in characters after normalisation: long enough for a first and last name,
/// short enough for a member list.
pub const MAX_NAME_CHARS: usize = 32;
/// The name the HTTP API posts as when it is given none.
pub const SERVER: &str = "server";
/// Names the server hands out are this prefix and the connection id (`guest-7`).
pub const GUEST_PREFIX: &str = "guest-";
/// Longest input looked at, in bytes (32 characters take at most 128; the rest is room for
/// decomposed accents): NFKC can turn one character into 18, so a 64 KiB frame would otherwise
/// cost a megabyte of work before the length check.
const MAX_RAW_BYTES: usize = 1024;

/// Why a name was refused. The messages are shown to the user as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a name needs at least one visible character")]
    Empty,
    #[error("names are at most {MAX_NAME_CHARS} characters")]
    TooLong,
    #[error("names may not contain invisible, formatting or control characters (U+{:04X})", u32::from(*.0))]
    Invisible(char),
    #[error("names may contain plain spaces between words, no other separator (U+{:04X})", u32::from(*.0))]
    Separator(char),
    #[error("a word of a name may not start with a combining mark (U+{:04X})", u32::from(*.0))]
    LeadingMark(char),
    #[error("the name {0:?} is reserved for the server")]
    Reserved(String),
}

/// A nickname a user asked for, checked by every rule above: the name to show, normalised.
pub fn check(raw: &str) -> Result<String, NameError> {
    let name = normalise(raw)?;
    if is_reserved(&name) {
        return Err(NameError::Reserved(name));
    }
    Ok(name)
}

/// The sender name given to the HTTP API: the same rules as [`check`], except that the API may
/// post as [`SERVER`] (exactly that: not `Server`, nor a look-alike), its default sender.
pub fn check_sender(raw: &str) -> Result<String, NameError> {
    let name = normalise(raw)?;
    if name == SERVER {
        return Ok(name);
    }
    check(&name)
}

/// Rules 1 to 4 (no reservation): a name as it can be shown, or the name of a private message's
/// receiver, who may well be a `guest-N`.
pub fn normalise(raw: &str) -> Result<String, NameError> {
    let raw = raw.trim();
    if raw.len() > MAX_RAW_BYTES {
        return Err(NameError::TooLong);
    }
    let nfkc: String = raw.nfkc().collect();
    let words: Vec<&str> = nfkc.trim().split(' ').filter(|w| !w.is_empty()).collect();
    for word in &words {
        check_word(word)?;
    }
    let name = words.join(" ");
    match name.chars().count() {
        0 => Err(NameError::Empty),
        n if n > MAX_NAME_CHARS => Err(NameError::TooLong),
        _ => Ok(name),
    }
}

/// The uniqueness key: two names with the same key are the same name. It is the confusable
/// skeleton (Unicode TR 39) of the lower-cased NFKC form, lower-cased again because some
/// skeletons are capitals (the skeleton of `0` is `O`, which must meet `o`).
pub fn key(name: &str) -> String {
    let folded = name.nfkc().collect::<String>().to_lowercase();
    unicode_security::skeleton(&folded)
        .collect::<String>()
        .to_lowercase()
}

/// One word (no spaces) of a normalised name: rule 3.
fn check_word(word: &str) -> Result<(), NameError> {
    if let Some(first) = word.chars().next()
        && first.general_category_group() == GeneralCategoryGroup::Mark
    {
        return Err(NameError::LeadingMark(first));
    }
    for c in word.chars() {
        if is_invisible(c) {
            return Err(NameError::Invisible(c));
        }
        if c.general_category_group() == GeneralCategoryGroup::Separator {
            return Err(NameError::Separator(c));
        }
    }
    Ok(())
}

/// Control, format, private-use and unassigned characters, and the default-ignorable ones that
/// are letters or marks (U+3164 HANGUL FILLER, U+034F, the variation selectors).
fn is_invisible(c: char) -> bool {
    c.general_category_group() == GeneralCategoryGroup::Other
        || c.identifier_type() == Some(IdentifierType::Default_Ignorable)
}

/// `server` or `guest-<digits>`, or a name whose key is one of theirs.
fn is_reserved(name: &str) -> bool {
    let name_key = key(name);
    // The key of `guest-12` is `guest-l2` (a `1` looks like an `l`): compare in key space.
    let digit_keys = key("0123456789-");
    let guest_like = name_key
        .strip_prefix(&key(GUEST_PREFIX))
        .is_some_and(|tail| {
            !tail.is_empty()
                && tail
                    .chars()
                    .all(|c| c.is_numeric() || digit_keys.contains(c))
        });
    guest_like || name_key == key(SERVER)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refused outright, whoever is online.
    #[test]
    fn invisible_and_format_characters_are_refused() {
        let cases = [
            ("alice\u{200B}", NameError::Invisible('\u{200B}')), // zero width space
            ("ali\u{200D}ce", NameError::Invisible('\u{200D}')), // zero width joiner
            ("\u{202E}ecila", NameError::Invisible('\u{202E}')), // right-to-left override
            ("\u{FEFF}alice", NameError::Invisible('\u{FEFF}')), // byte order mark
            ("al\u{AD}ice", NameError::Invisible('\u{AD}')),     // soft hyphen
            ("\u{200B}", NameError::Invisible('\u{200B}')),
            ("\u{3164}", NameError::Invisible('\u{1160}')), // NFKC maps it to another filler
            ("a\u{3164}b", NameError::Invisible('\u{1160}')),
            ("a\u{FE0F}", NameError::Invisible('\u{FE0F}')), // variation selector
            ("a\u{E000}", NameError::Invisible('\u{E000}')), // private use
            ("a\u{0378}", NameError::Invisible('\u{0378}')), // unassigned
            ("tab\there", NameError::Invisible('\t')),
            ("ali\u{2028}ce", NameError::Separator('\u{2028}')),
            ("ali\u{2029}ce", NameError::Separator('\u{2029}')),
            ("ali\u{1680}ce", NameError::Separator('\u{1680}')),
            ("\u{301}alice", NameError::LeadingMark('\u{301}')),
            ("bob \u{301}x", NameError::LeadingMark('\u{301}')),
        ];
        for (raw, error) in cases {
            assert_eq!(check(raw), Err(error), "{raw:?}");
        }
    }

    #[test]
    fn length_and_emptiness_count_after_normalisation() {
        assert_eq!(check(""), Err(NameError::Empty));
        assert_eq!(check(" \u{3000}\n "), Err(NameError::Empty));
        assert_eq!(check(&"é".repeat(32)), Ok("é".repeat(32)));
        assert_eq!(check(&"e\u{301}".repeat(32)), Ok("é".repeat(32)));
        assert_eq!(check(&"x".repeat(33)), Err(NameError::TooLong));
        // One compatibility character can become many.
        assert_eq!(check(&"\u{FDFA}".repeat(2)), Err(NameError::TooLong));
        // A huge input is refused before it is normalised; surrounding whitespace is not counted.
        assert_eq!(check(&"\u{FDFA}".repeat(20_000)), Err(NameError::TooLong));
        let padded = format!("{}ada{}", " ".repeat(2_000), "\n".repeat(2_000));
        assert_eq!(check(&padded).as_deref(), Ok("ada"));
    }

    /// Accepted, but the key makes them the same name as `alice`.
    #[test]
    fn look_alikes_share_the_key_of_alice() {
        let alice = key("alice");
        let look_alikes = [
            "Alice",
            "ALICE",
            "ａｌｉｃｅ",            // full width
            "ＡＬＩＣＥ",            // full width capitals
            "𝐚𝐥𝐢𝐜𝐞",                 // mathematical bold
            "\u{430}li\u{441}e",     // Cyrillic а and с
            "\u{410}LI\u{421}E",     // Cyrillic capitals
            "al\u{131}ce",           // dotless i
            "a\u{217C}ice",          // small roman numeral fifty
            "al\u{0456}ce",          // Cyrillic і
            "  alice\u{2028}\u{85}", // separators at the ends are trimmed
        ];
        for raw in look_alikes {
            let name = check(raw).unwrap_or_else(|e| panic!("{raw:?}: {e}"));
            assert_eq!(key(&name), alice, "{raw:?} -> {name:?}");
        }
        assert_eq!(key("rn"), key("m"));
        assert_eq!(key("b0b"), key("bob"));
        assert_ne!(key("alice"), key("alicia"));
        assert_ne!(key("a lice"), key("alice"));
    }

    #[test]
    fn normalisation_gives_the_plain_form() {
        assert_eq!(check("  ａｌｉｃｅ  ").as_deref(), Ok("alice"));
        assert_eq!(check("𝐚𝐥𝐢𝐜𝐞").as_deref(), Ok("alice"));
        assert_eq!(
            check("anne\u{A0} \u{3000}marie").as_deref(),
            Ok("anne marie")
        );
        assert_eq!(check("Zoe\u{308}").as_deref(), Ok("Zoë"));
    }

    #[test]
    fn server_and_guest_names_are_reserved() {
        for raw in [
            "server",
            "Server",
            "ѕerver", // Cyrillic ѕ
            "ｓｅｒｖｅｒ",
            "guest-99",
            "Guest-1",
            "guest-7-2",
            "guest-l0", // looks like guest-10
            "ɡuest-5",  // Latin small script g
            "guest-١٢", // Arabic-Indic digits
        ] {
            assert!(
                matches!(check(raw), Err(NameError::Reserved(_))),
                "{raw:?}: {:?}",
                check(raw)
            );
        }
        for free in ["guest", "guest-", "guest-bob", "servers", "guest99"] {
            assert_eq!(check(free).as_deref(), Ok(free));
        }
    }

    #[test]
    fn the_api_may_post_as_server_and_nothing_else_reserved() {
        assert_eq!(check_sender("server").as_deref(), Ok(SERVER));
        assert_eq!(check_sender(" ｓｅｒｖｅｒ ").as_deref(), Ok(SERVER));
        assert_eq!(check_sender("deploy-bot").as_deref(), Ok("deploy-bot"));
        for reserved in ["Server", "ѕerver", "guest-3"] {
            assert!(matches!(
                check_sender(reserved),
                Err(NameError::Reserved(_))
            ));
        }
        assert_eq!(
            check_sender("a\u{200B}"),
            Err(NameError::Invisible('\u{200B}'))
        );
    }

    #[test]
    fn ordinary_names_stay_valid_and_distinct() {
        let names = [
            "Ada",
            "José",
            "李雷",
            "Zoë",
            "o'brien",
            "anne-marie",
            "Anna Иванова",
            "Δημήτρης",
            "محمد",
            "🦀",
            "ferris 🦀",
            "guest",
        ];
        for name in names {
            assert_eq!(check(name).as_deref(), Ok(name));
            assert_eq!(check(name).map(|n| key(&n)), Ok(key(name)));
        }
        let mut keys: Vec<String> = names.iter().map(|n| key(n)).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), names.len(), "no two of them collide");
    }

    #[test]
    fn checking_is_idempotent() {
        for raw in [
            "  ａｌｉｃｅ  ",
            "anne  marie",
            "Zoe\u{308}",
            "\u{FB01}sh",
            "𝐚𝐥𝐢𝐜𝐞",
        ] {
            let once = check(raw).unwrap_or_else(|e| panic!("{raw:?}: {e}"));
            assert_eq!(check(&once).as_deref(), Ok(once.as_str()));
        }
    }
}
