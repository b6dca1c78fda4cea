//! The `google.api.http` path-template parser and matcher: any source and
//! any path give a template or an error, a match or none, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshkit_gateway::template::Template;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // The first line is the template, the rest a path to match against it.
    let (source, path) = text.split_once('\n').unwrap_or((text, text));
    if let Ok(template) = Template::parse(source) {
        let _ = template.matches(path);
        let _ = template.openapi_path();
    }
});
