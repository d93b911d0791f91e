# A NixOS VM test of services.narflow (pkgs.testers.runNixOSTest; the flake's
# checks.<system>.vm): what the offline checks cannot see. systemd starts the hardened
# unit with its credentials; nix-daemon runs narflow-hook after a build; the build's
# output reaches a file:// cache signed with the key; the daemon cannot write the Nix
# database file; the key is readable by the unit alone. It needs KVM and a network to
# fetch nixpkgs: `nix build .#checks.x86_64-linux.vm`.
{ self }:
{
  name = "narflow";

  nodes.machine =
    { config, pkgs, ... }:
    {
      imports = [ self.nixosModules.default ];

      services.narflow = {
        enable = true;
        to = "file:///var/cache/narflow";
        secretKeyFiles = [ "/var/lib/narflow-key/key.sec" ];
        uploadLogs = true;
        metricsListen = "127.0.0.1:9464";
      };

      # The key, made once before narflow starts (a real machine brings its own).
      systemd.services.narflow-key = {
        wantedBy = [ "narflow.service" ];
        before = [ "narflow.service" ];
        path = [ config.nix.package ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          UMask = "0077";
        };
        script = ''
          mkdir -p /var/lib/narflow-key
          cd /var/lib/narflow-key
          [ -e key.sec ] || nix-store --generate-binary-cache-key vm-test-1 key.sec key.pub
        '';
      };
      systemd.tmpfiles.rules = [ "d /var/cache/narflow 0755 root root -" ];

      nix.settings.experimental-features = [ "nix-command" ];
    };

  testScript = ''
    machine.wait_for_unit("narflow.service")
    machine.wait_for_open_port(9464)

    # The key reaches the unit as a credential only it can read.
    machine.succeed("test -z \"$(find /var/lib/narflow-key/key.sec -perm /077)\"")
    print(machine.succeed("systemctl show narflow -p LoadCredential -p ExecStart"))
    pid = machine.succeed("systemctl show narflow -p MainPID --value").strip()
    machine.succeed(f"test \"$(stat -c %a /proc/{pid}/root/run/credentials/narflow.service/secret-key-0)\" = 400")

    # The hardening holds: the Nix database file is mounted read-only for the unit.
    machine.succeed(f"grep -q ' /nix/var/nix/db/db.sqlite .*ro[, ]' /proc/{pid}/mountinfo")

    # A build through nix-daemon: the post-build hook hands its output to the daemon.
    out = machine.succeed(
      "nix-build --no-out-link -E 'derivation { name = \"narflow-vm-test\"; system = builtins.currentSystem; "
      "builder = \"/bin/sh\"; args = [ \"-c\" \"echo built > $out\" ]; }'"
    ).strip()
    hash = out.split("/")[-1][:32]
    machine.wait_until_succeeds(f"test -s /var/cache/narflow/{hash}.narinfo", timeout=60)
    machine.succeed(f"grep -q '^Sig: vm-test-1:' /var/cache/narflow/{hash}.narinfo")
    public = machine.succeed("cat /var/lib/narflow-key/key.pub").strip()
    machine.succeed(
      f"nix store verify --store file:///var/cache/narflow --trusted-public-keys '{public}' {out}"
    )

    # The metrics answer on loopback; a stop is clean.
    machine.succeed("curl -sf http://127.0.0.1:9464/metrics")
    machine.succeed("systemctl stop narflow")
    machine.succeed("test \"$(systemctl show narflow -p Result --value)\" = success")
  '';
}
