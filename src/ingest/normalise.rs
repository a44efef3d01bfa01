//! How reported metadata is tidied and matched. Players disagree on spacing, case and where
//! a featured artist goes ("A feat. B" as the artist, "Song (feat. B)" as the title): shown
//! text keeps the player's words with the spacing tidied, matching folds all of that away.

/// Collapses runs of whitespace to one space and trims the ends.
pub fn tidy(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Words that introduce a featured artist.
const FEATURING: [&str; 5] = ["feat.", "feat", "ft.", "ft", "featuring"];

/// `text` without its featured-artist credit: from a `(feat. …)` or `[feat. …]` group, or
/// from a bare `feat.` word to the end.
fn without_credit(text: &str) -> String {
    let lower = text.to_lowercase();
    // The byte offsets of `lower` match `text` only when lowercasing kept every length
    // (true of the credits' own ASCII); otherwise the text is matched as it is.
    if lower.len() != text.len() {
        return text.to_owned();
    }
    let mut cut = text.len();
    for open in ["(", "["] {
        for word in FEATURING {
            let needle = format!("{open}{word} ");
            if let Some(at) = lower.find(&needle) {
                cut = cut.min(at);
            }
        }
    }
    for word in FEATURING {
        let needle = format!(" {word} ");
        if let Some(at) = lower.find(&needle) {
            cut = cut.min(at);
        }
    }
    text.get(..cut).unwrap_or(text).trim_end().to_owned()
}

/// Text as a new catalog track keeps it: tidied, credits dropped, case kept. Everything it
/// says is in the match key but its case, so a first report cannot put words of its own on
/// a track others will share.
pub fn uncredited(text: &str) -> String {
    tidy(&without_credit(&tidy(text)))
}

/// Folds text for matching: tidied, lower-cased, credits dropped.
pub fn fold(text: &str) -> String {
    uncredited(text).to_lowercase()
}

/// The key a track is matched by when it has no ISRC: artist, title and album folded.
pub fn match_key(artist: &str, title: &str, album: Option<&str>) -> String {
    format!(
        "{}\u{1f}{}\u{1f}{}",
        fold(artist),
        fold(title),
        album.map(fold).unwrap_or_default()
    )
}

/// An ISRC in its canonical form (upper case, no hyphens or spaces), or `None` when it is not
/// one: two letters, three letters or digits, seven digits.
pub fn isrc(raw: &str) -> Option<String> {
    let code: String = raw
        .chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    let bytes = code.as_bytes();
    let valid = bytes.len() == 12
        && bytes.iter().take(2).all(u8::is_ascii_uppercase)
        && bytes.iter().skip(2).take(3).all(u8::is_ascii_alphanumeric)
        && bytes.iter().skip(5).all(u8::is_ascii_digit);
    valid.then_some(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacing_is_tidied_and_case_folded_for_matching() {
        assert_eq!(tidy("  Daft \t Punk  "), "Daft Punk");
        assert_eq!(fold("  DAFT   punk "), "daft punk");
    }

    #[test]
    fn featured_artists_do_not_change_the_match() {
        let plain = match_key("Daft Punk", "Get Lucky", Some("Random Access Memories"));
        for (artist, title) in [
            ("Daft Punk feat. Pharrell Williams", "Get Lucky"),
            ("Daft Punk ft. Pharrell Williams", "Get Lucky"),
            ("Daft Punk Featuring Pharrell Williams", "Get Lucky"),
            ("Daft Punk", "Get Lucky (feat. Pharrell Williams)"),
            ("daft punk", "Get Lucky [Ft. Pharrell Williams]"),
        ] {
            assert_eq!(
                match_key(artist, title, Some("Random  Access Memories")),
                plain,
                "{artist} / {title}"
            );
        }
        // A word merely starting like a credit is kept.
        assert_ne!(fold("Left Feather"), fold("Left"));
        assert_ne!(
            match_key("A", "Song", Some("One")),
            match_key("A", "Song", Some("Two"))
        );
    }

    #[test]
    fn isrcs_are_canonical_or_refused() {
        assert_eq!(isrc("us-rc1-76-07839").as_deref(), Some("USRC17607839"));
        assert_eq!(isrc("GBAYE0601498").as_deref(), Some("GBAYE0601498"));
        for bad in [
            "",
            "USRC1760783",
            "USRC176078390",
            "1SRC17607839",
            "USRC1760783X",
        ] {
            assert_eq!(isrc(bad), None, "{bad}");
        }
    }
}
