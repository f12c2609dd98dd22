//! A confirmed bad release must not leave its machine beyond the deployer's reach (issue 13,
//! item 5): the agent keeps its own socket when a service removes it. Real containers, real
//! Nix, the real agent, in a network namespace of the test's own.

mod common;

use std::time::{Duration, Instant};

use common::{row, Fleet};

/// A web server serving `page`; `extra` is added to the machine's settings.
fn web(page: &str, extra: &str) -> String {
    format!(
        r#"{{ meta.name = "rec"; machines.web = {{ pkgs, ... }}: let
    site = pkgs.runCommand "site" {{}} ''
      mkdir $out
      echo '{page}' > $out/index.html
    '';
  in {{
    packages = [ pkgs.busybox ];
    binsh = "${{pkgs.busybox}}/bin/sh";
    services.httpd = {{
      command = [ "${{pkgs.busybox}}/bin/httpd" "-f" "-p" "80" "-h" "${{site}}" ];
      healthCheck = {{ http = "http://127.0.0.1/"; interval = 1; retries = 3; timeout = 2; }};
    }};
    {extra}
  }}; }}
"#
    )
}

/// A service that removes the agent's socket a moment after the deploy was confirmed, and
/// again whenever it has been put back, for a while.
const SOCKET_EATER: &str = r#"services.eater = {
      script = "sleep 4; i=0; while [ $i -lt 20 ]; do rm -f /run/flotilla/agent.sock; i=$((i+1)); sleep 0.2; done; touch /run/eater-done; sleep 1000000";
      environment.PATH = "${pkgs.busybox}/bin";
    };"#;

#[test]
fn the_agent_recreates_its_socket_when_a_service_removes_it() {
    let f = Fleet::new();
    let file = f.fl.file("rec.nix", &web("v1", ""));
    let (code, _, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");

    f.fl.file("rec.nix", &web("v2", SOCKET_EATER));
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(row(&report, "web")["generation"], 2);

    // Wait until the service is done removing the socket.
    let start = Instant::now();
    while f.run(&["exec", "web", "--", "test", "-e", "/run/eater-done"]).code() != 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the socket eater never finished");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2)); // the agent's next look at its socket

    let m = f.machine(&file, "web");
    assert_eq!(m["generation"], 2, "the agent answers again: {m:#}");
    assert!(!m["problems"].to_string().contains("unreachable"), "{m:#}");
    f.fl.file("rec.nix", &web("v3", ""));
    let (code, report, out) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "a deploy reaches the agent again\n{out}");
    assert_eq!(row(&report, "web")["generation"], 3);
    f.run(&["reboot", "-f", &file]).ok();
    assert_eq!(f.machine(&file, "web")["generation"], 3);
}
