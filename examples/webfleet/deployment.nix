# Two web servers serving a page built by Nix on the local platform (namespace containers),
# a third as a QEMU virtual machine on the same bridge and subnet, and a monitor that polls
# them at the addresses they got when they were provisioned (`nodes.web1.ip`).
#
#   flotilla deploy -f examples/webfleet/deployment.nix
#
# Written against nixpkgs' names; the README runs it with `-I nixpkgs=nix/demo-pkgs.nix`.
{
  meta = {
    name = "webfleet";
    description = "two busybox web servers and a monitor";
  };

  # Every machine starts from these; a machine's own settings are merged over them.
  defaults = { pkgs, ... }: {
    packages = [ pkgs.busybox ];
    binsh = "${pkgs.busybox}/bin/sh";
    files."/etc/motd".text = "Managed by flotilla. Changes here are lost at the next deploy.\n";
  };

  machines =
    let
      # Each web server's port 80 is also forwarded to the host's loopback, so a browser on
      # the deploying host can open http://127.0.0.1:8081/ and http://127.0.0.1:8082/.
      hostPorts = { web1 = 8081; web2 = 8082; };

      webServer = { name, nodes, pkgs, ... }:
        let
          site = pkgs.writeTextDir "index.html" ''
            <!doctype html>
            <title>${name}</title>
            <h1>Hello from ${name}</h1>
          '';
        in
        {
          tags = [ "web" ];
          platform.forwardPorts = [ { host = hostPorts.${name}; guest = 80; } ];
          users.www = { home = "/var/empty"; };
          services.httpd = {
            command = [ "${pkgs.busybox}/bin/httpd" "-f" "-p" "80" "-h" "${site}" ];
            user = "www";
            # Probed by the agent inside the machine after each activation: a deploy whose
            # page does not answer is rolled back by the machine itself.
            healthCheck = { http = "http://127.0.0.1:80/"; timeout = 3; };
          };
          # Probed by the deployer before it confirms the new generation: the page as the
          # rest of the network reaches it.
          checks.page.http = "http://${nodes.${name}.ip}/";
        };
    in
    {
      web1 = webServer;
      web2 = webServer;

      # The same web server as a VM: its own kernel (the package set's `linux`), disk and
      # store, booted by QEMU; deployed, checked and rolled back like the containers, on the
      # same bridge (the others reach it by name), its port 80 forwarded to 127.0.0.1:8083.
      vm1 = args@{ pkgs, ... }: webServer args // {
        tags = [ "web" "vm" ];
        platform = { type = "qemu"; memory = 256; forwardPorts = [ { host = 8083; guest = 80; } ]; };
        boot.kernel = pkgs.linux;
      };

      monitor = { nodes, pkgs, ... }: {
        tags = [ "ops" ];
        files."/etc/monitor/targets".text = ''
          http://${nodes.web1.ip}/
          http://${nodes.web2.ip}/
          http://${nodes.vm1.ip}/
        '';
        keys.alert-token = {
          text = "example-token-not-a-real-secret";
          destDir = "/run/keys";
        };
        services.poll = {
          script = ''
            while true; do
              for url in $(cat /etc/monitor/targets); do
                if wget -q -O /dev/null "$url"; then echo "up   $url"; else echo "DOWN $url"; fi
              done
              sleep 10
            done
          '';
          environment.PATH = "${pkgs.busybox}/bin";
          keys = [ "alert-token" ];
          restart = "always";
        };
      };
    };
}
