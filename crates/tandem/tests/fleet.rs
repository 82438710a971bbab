//! A fleet on one machine (tests/fleet/test_fleet.py): nats-server, the SGLang Model Gateway,
//! two `tandem serve` workers and a fleet trainer over loopback, each killed in turn.
use std::path::PathBuf;

fn smollm2() -> PathBuf {
    tandem_testkit::smollm2()
}

#[test]
fn a_fleet_behind_the_gateway_learns_one_drafter_and_survives_every_component_killed() {
    // The broker and the gateway are found by the script (console scripts of these packages).
    tandem_testkit::require_python(&["nats", "smg"]);
    let status = tandem_testkit::python_script("tests/fleet/test_fleet.py")
        .arg(env!("CARGO_BIN_EXE_tandem"))
        .arg(smollm2())
        .status()
        .unwrap();
    assert!(status.success(), "tests/fleet/test_fleet.py failed (output above)");
}
