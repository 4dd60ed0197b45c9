//! The config reader on any text: it answers with a config or with problems, each on a
//! line of the text (0 for the file as a whole), and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.lines().count() + 1;
    if let Err(problems) = lb_api::config::parse(text, std::path::Path::new("/nonexistent")) {
        assert!(!problems.is_empty(), "refused with no problem said");
        for p in problems {
            assert!(
                p.line <= lines,
                "problem on line {} of {lines}: {p:?}",
                p.line
            );
        }
    }
});
