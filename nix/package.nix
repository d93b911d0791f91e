# narflow and narflow-hook, for `callPackage` (the flake's packages.default and overlay).
#
# Name, version, description and licence come from Cargo.toml. The check phase runs the
# library's unit tests: they need neither a Nix daemon nor an S3 server (the integration
# tests in tests/ need both, and are left out of the source).
{
  lib,
  stdenv,
  rustPlatform,
  installShellFiles,
}:
let
  cargoToml = lib.importTOML ../Cargo.toml;
  # Cargo.toml's `license`, an SPDX expression of the form "A OR B".
  licenseIds = lib.splitString " OR " cargoToml.package.license;
in
rustPlatform.buildRustPackage {
  pname = cargoToml.package.name;
  inherit (cargoToml.package) version;

  # What the build and the unit tests read: the manifest and lock, the sources, the
  # benches Cargo.toml declares (cargo refuses a manifest whose targets are missing), and
  # the example config file a settings test reads.
  # (A filter rather than lib.fileset, so that the expression also evaluates with the Nix
  # 2.8 the offline checks use.)
  src = lib.cleanSourceWith {
    name = "narflow-source";
    src = ../.;
    filter =
      path: _type:
      let
        rel = lib.removePrefix "${toString ../.}/" (toString path);
      in
      lib.elem rel [
        "Cargo.toml"
        "Cargo.lock"
        "src"
        "benches"
        "contrib"
        "contrib/narflow.toml"
      ]
      || lib.hasPrefix "src/" rel
      || lib.hasPrefix "benches/" rel;
  };

  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [ installShellFiles ];

  # Both binaries (narflow, narflow-hook) are built: no --bin restricts the build.
  cargoTestFlags = [ "--lib" ];

  # Completions and man pages come from the built binary, so only where it runs.
  postInstall = lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
    installShellCompletion --cmd narflow \
      --bash <($out/bin/narflow completions bash) \
      --zsh <($out/bin/narflow completions zsh) \
      --fish <($out/bin/narflow completions fish)
    mkdir -p man
    $out/bin/narflow man man
    installManPage man/*.1
  '';

  meta = {
    inherit (cargoToml.package) description;
    license = map lib.getLicenseFromSpdxId licenseIds;
    mainProgram = "narflow";
    # Built and tested on Linux only (syncfs, /proc, the Nix daemon's Linux paths).
    platforms = lib.platforms.linux;
  };
}
