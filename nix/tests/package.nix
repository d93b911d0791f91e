# Tests of nix/package.nix, for lib.runTests: it is called with a stand-in rustPlatform
# whose buildRustPackage returns its arguments, so the tests see what would be built
# (name, version, source, lock file, tests run, install steps) without nixpkgs or a build.
# Cargo.toml is read here with a regular expression, not the TOML reader the package uses.
{
  lib,
  package ? ../package.nix,
}:
let
  installShellFiles = {
    name = "installShellFiles-stand-in";
  };
  call =
    canExecute:
    import package {
      inherit lib installShellFiles;
      stdenv = {
        hostPlatform = {
          system = "aarch64-linux";
        };
        buildPlatform = {
          system = "x86_64-linux";
          canExecute = _: canExecute;
        };
      };
      rustPlatform.buildRustPackage = args: args;
    };
  native = call true;
  cross = call false;

  cargoToml = builtins.readFile ../../Cargo.toml;
  # The first `key = "value"` line (the [package] table comes first in Cargo.toml).
  field =
    key:
    builtins.head (
      builtins.match ".*\n${key} = \"([^\"]*)\"\n.*" ("\n" + builtins.head (lib.splitString "\n[" cargoToml) + "\n")
    );
  # [[bin]] names.
  binaries = lib.concatMap (
    section:
    let
      m = builtins.match "bin]]\nname = \"([^\"]*)\".*" section;
    in
    if m == null then [ ] else m
  ) (lib.splitString "\n[[" cargoToml);
in
{
  testName = {
    expr = {
      inherit (native) pname version;
    };
    expected = {
      pname = field "name";
      version = field "version";
    };
  };
  testCargoLock = {
    expr = native.cargoLock.lockFile;
    expected = ../../Cargo.lock;
  };
  # The unit tests run in the build sandbox; the integration tests (a Nix daemon, S3)
  # do not.
  testRunsTheLibraryUnitTests = {
    expr = {
      doCheck = native.doCheck or true;
      inherit (native) cargoTestFlags;
    };
    expected = {
      doCheck = true;
      cargoTestFlags = [ "--lib" ];
    };
  };
  # Both binaries: Cargo.toml declares them, and nothing narrows the build to one.
  testBuildsEveryBinary = {
    expr = {
      inherit binaries;
      flags = lib.filter (
        f:
        lib.elem f [
          "--bin"
          "--package"
          "-p"
        ]
      ) (native.cargoBuildFlags or [ ]);
    };
    expected = {
      binaries = [
        "narflow"
        "narflow-hook"
      ];
      flags = [ ];
    };
  };
  # The source is what the build and the unit tests read, nothing else (no target/,
  # tests/, fuzz/, docs).
  testSourceHoldsWhatTheBuildReads = {
    expr = {
      top = builtins.readDir native.src;
      contrib = builtins.readDir "${native.src}/contrib";
    };
    expected = {
      top = {
        "Cargo.lock" = "regular";
        "Cargo.toml" = "regular";
        benches = "directory";
        contrib = "directory";
        src = "directory";
      };
      contrib = {
        "narflow.toml" = "regular";
      };
    };
  };
  testSourceHasTheHookAndMain = {
    expr = map (f: builtins.pathExists "${native.src}/${f}") [
      "src/main.rs"
      "src/bin/narflow-hook.rs"
      "src/lib.rs"
    ];
    expected = [
      true
      true
      true
    ];
  };
  testCompletionsAndManPages = {
    expr = map (w: lib.hasInfix w native.postInstall) [
      "installShellCompletion --cmd narflow"
      "--bash <($out/bin/narflow completions bash)"
      "--zsh <($out/bin/narflow completions zsh)"
      "--fish <($out/bin/narflow completions fish)"
      "$out/bin/narflow man man"
      "installManPage man/*.1"
    ];
    expected = lib.genList (_: true) 6;
  };
  testInstallShellFilesIsANativeInput = {
    expr = lib.elem installShellFiles native.nativeBuildInputs;
    expected = true;
  };
  # A binary the build platform cannot run makes neither.
  testCrossBuildRunsNothingItBuilt = {
    expr = cross.postInstall;
    expected = "";
  };
  testMeta = {
    expr = {
      inherit (native.meta) mainProgram description;
      licenses = map (l: l.spdxId) native.meta.license;
    };
    expected = {
      mainProgram = "narflow";
      description = field "description";
      licenses = lib.splitString " OR " (field "license");
    };
  };
}
