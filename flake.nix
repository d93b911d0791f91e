{
  description = "narflow: upload Nix store paths to binary caches (S3, file://) fast, with bounded memory";

  # A NixOS release: its rustc is newer than Cargo.toml's rust-version (1.95, April 2026),
  # and the NixOS options nix/module.nix sets are those of 26.11. flake.lock pins the
  # revision (`nix flake lock` writes it; `nix flake update` moves it along the branch).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.11";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      # Linux only: see meta.platforms in nix/package.nix.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = final: _prev: {
        narflow = final.callPackage ./nix/package.nix { };
      };

      packages = forAllSystems (pkgs: rec {
        narflow = pkgs.callPackage ./nix/package.nix { };
        default = narflow;
      });

      apps = forAllSystems (
        pkgs:
        let
          narflow = {
            type = "app";
            program = lib.getExe self.packages.${pkgs.stdenv.hostPlatform.system}.narflow;
            meta.description = "narflow's command line";
          };
        in
        {
          inherit narflow;
          default = narflow;
        }
      );

      # services.narflow, with this flake's narflow as its package (a system that applies
      # overlays.default can set services.narflow.package = pkgs.narflow instead).
      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nix/module.nix ];
          services.narflow.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };
      nixosModules.narflow = self.nixosModules.default;

      # The build's tools, and what scripts/test uses beside them (python3 for the moto S3
      # server and the bench scripts, strace for the durability test, valgrind for the
      # instruction-count guard).
      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.default ];
          packages = with pkgs; [
            clippy
            rustfmt
            rust-analyzer
            python3
            strace
            valgrind
          ];
        };
      });

      checks = forAllSystems (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        # A NixOS VM: the unit starts, a build's outputs reach the cache signed.
        vm = pkgs.testers.runNixOSTest (import ./nix/tests/vm.nix { inherit self; });
      });
    };
}
