//! Source specs and config files: parsing, errors, TOML.

use std::path::PathBuf;

use crate::{CropConfig, DataConfig, DataError, SourceSpec, Split};

#[test]
fn specs_parse_and_print_back() {
    let cases = [
        (
            "folder:/data/photos",
            SourceSpec::Folder(PathBuf::from("/data/photos")),
        ),
        (
            "idx:/usr/share/datasets/fashion-mnist",
            SourceSpec::Idx {
                path: PathBuf::from("/usr/share/datasets/fashion-mnist"),
                split: Split::Train,
            },
        ),
        (
            "idx:fm:test",
            SourceSpec::Idx {
                path: PathBuf::from("fm"),
                split: Split::Test,
            },
        ),
        (
            "synthetic",
            SourceSpec::Synthetic {
                seed: 0,
                size: None,
            },
        ),
        (
            "synthetic:42",
            SourceSpec::Synthetic {
                seed: 42,
                size: None,
            },
        ),
        (
            "synthetic:42:64",
            SourceSpec::Synthetic {
                seed: 42,
                size: Some(64),
            },
        ),
        (
            "copypaste:/x/cp:train",
            SourceSpec::CopyPaste {
                path: PathBuf::from("/x/cp"),
                split: Split::Train,
            },
        ),
        (
            "folder:C:stuff",
            SourceSpec::Folder(PathBuf::from("C:stuff")),
        ),
    ];
    for (text, want) in cases {
        let got: SourceSpec = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(got, want, "{text}");
        assert_eq!(
            got.to_string().parse::<SourceSpec>().expect("round trip"),
            got
        );
    }
    assert_eq!(SourceSpec::default().to_string(), "synthetic:0");
}

#[test]
fn bad_specs_say_what_is_expected() {
    let cases = [
        ("", "empty spec"),
        ("folder", "needs a path"),
        ("folder:", "needs a path"),
        ("idx::test", "needs a path before the split"),
        ("imagenet:/x", "unknown source kind \"imagenet\""),
        ("synthetic:abc", "seed \"abc\" is not an unsigned integer"),
        ("synthetic:1:2:3", "at most a seed and a size"),
        ("synthetic:1:4", "between 8 and 4096"),
    ];
    for (text, needle) in cases {
        let err = text.parse::<SourceSpec>().expect_err(text);
        assert!(matches!(err, DataError::Spec { .. }));
        let msg = err.to_string();
        assert!(msg.contains(needle), "{text:?}: {msg}");
        assert!(
            msg.contains(&format!("{text:?}")),
            "the message quotes the spec: {msg}"
        );
    }
}

#[test]
fn data_config_reads_from_toml_with_defaults_and_rejects_unknown_keys() {
    let cfg: DataConfig = toml::from_str(
        r#"
        source = "idx:/usr/share/datasets/fashion-mnist:test"
        prefetch = 3
        [crops]
        global_size = 96
        local_size = 48
        blur = "as_written"
        gram_size = 192
        [crops.high_res]
        sizes = [{ global = 192, local = 48, gram = 288 }, { global = 288, local = 96 }]
        probs = [0.7, 0.3]
        [masks]
        patch_size = 8
        "#,
    )
    .expect("valid toml");
    assert_eq!(
        cfg.source,
        SourceSpec::Idx {
            path: PathBuf::from("/usr/share/datasets/fashion-mnist"),
            split: Split::Test
        }
    );
    assert_eq!(cfg.crops.global_size, 96);
    assert_eq!(cfg.crops.n_local, 8, "defaults fill the rest");
    assert_eq!(cfg.crops.blur, crate::BlurConvention::AsWritten);
    assert_eq!(
        cfg.crops.high_res.as_ref().map(|h| h.sizes[1].gram),
        Some(None)
    );
    assert_eq!(cfg.masks.patch_size, 8);
    cfg.validate().expect("valid");
    let back: DataConfig =
        toml::from_str(&toml::to_string(&cfg).expect("serialise")).expect("parse back");
    assert_eq!(back, cfg);

    let err = toml::from_str::<DataConfig>("[crops]\nglobal_sise = 96\n").expect_err("typo");
    assert!(err.to_string().contains("global_sise"), "{err}");
    let err = toml::from_str::<DataConfig>("source = \"imagenet:/x\"\n").expect_err("bad source");
    assert!(err.to_string().contains("unknown source kind"), "{err}");
}

#[test]
fn validation_lists_every_violation() {
    let cfg = CropConfig {
        global_scale: (0.5, 0.2),
        flip_p: 2.0,
        blur_kernel: 8,
        ..CropConfig::default()
    };
    let DataError::Config(list) = cfg.validate().expect_err("invalid") else {
        panic!("config error expected")
    };
    assert_eq!(list.len(), 3, "{list:?}");
    CropConfig::default()
        .validate()
        .expect("defaults are valid");
}
