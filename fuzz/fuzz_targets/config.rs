//! The config file: `VmConfig::from_json` (parse and validate). A config it accepts must
//! come back equal through `to_json` (what `GET /vm/config` answers), and every error
//! must format. Runs under the VMM thread's filter, which is where validation and
//! `to_json` run for an API-configured VM.
#![no_main]

use ember::config::VmConfig;
use ember_fuzz::{Confined, ThreadKind};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static VMM: Confined = Confined::start(ThreadKind::Vmm);
}

fuzz_target!(|data: &[u8]| {
    // The file is read with read_to_string: text that is not UTF-8 never gets here.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let text = text.to_string();
    VMM.with(|vmm| vmm.run(move || check(&text)));
});

fn check(text: &str) {
    match VmConfig::from_json(text) {
        Ok(config) => {
            let json = config.to_json();
            match VmConfig::from_json(&json) {
                Ok(back) => assert_eq!(back, config, "round trip through {json}"),
                Err(e) => panic!("to_json wrote a config from_json refuses: {e}\n{json}"),
            }
        }
        Err(e) => {
            let message = e.to_string();
            assert!(!message.is_empty());
        }
    }
}
