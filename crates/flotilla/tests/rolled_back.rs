//! After a deploy that rolled a machine back, the machine is as it was before that deploy,
//! and `check` and `info` compare it with what runs, not with the release that failed.

mod common;

use common::Fleet;

fn deployment(page: &str, broken: bool) -> String {
    let check = if broken { r#"services.web.healthCheck = { http = "http://127.0.0.1:81/"; timeout = 1; interval = 1; retries = 2; };"# } else { "" };
    format!(
        r#"{{
  meta.name = "rb";
  machines.box = {{ pkgs, ... }}: {{
    packages = [ pkgs.busybox ];
    files."/etc/page".text = "{page}\n";
    services.web.command = [ "${{pkgs.busybox}}/bin/httpd" "-f" "-p" "80" "-h" "${{pkgs.writeTextDir "index.html" "{page}"}}" ];
    {check}
  }};
}}"#
    )
}

#[test]
fn check_after_a_rolled_back_deploy_compares_with_what_runs() {
    let f = Fleet::new();
    let file = f.fl.file("deployment.nix", &deployment("one", false));
    let (code, _, said) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 0, "{said}");
    let file = f.fl.file("deployment.nix", &deployment("two", true));
    let (code, report, said) = f.deploy_json(&["-f", &file]);
    assert_eq!(code, 1, "{said}");
    assert_eq!(report["machines"][0]["outcome"], "rolled-back", "{report}");
    let ip = f.machine(&file, "box")["ip"].as_str().unwrap().to_owned();
    assert_eq!(f.http_get(&format!("http://{ip}/")).as_deref(), Some("one"));

    let check = f.run(&["check", "-f", &file]);
    assert_eq!(check.code(), 0, "check finds no drift: the machine runs generation 1, as the ledger says\n{}\n{}", check.stdout(), check.stderr());
    let info = f.machine(&file, "box");
    assert_eq!(info["generation"], 1, "{info}");
    assert_eq!(info["health"], "healthy", "{info}");
    assert_eq!(info["problems"], serde_json::json!([]), "{info}");
    // The failed release's /etc is gone with it.
    assert_eq!(f.run(&["exec", "-f", &file, "box", "--", "cat", "/etc/page"]).ok().stdout(), "one\n");
}
