from __future__ import annotations

import shutil

from pipelines.batch import BundleModel, bundle_hash
from tests.batch.conftest import BUNDLE


def test_bundle_hash_covers_configs_and_the_weights_in_use_only(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    shutil.copy(BUNDLE / "models" / "model.pt", bundle / "models" / "model.pt")
    first = bundle_hash(bundle)
    assert len(first) == 64 and bundle_hash(bundle) == first

    # a training run's checkpoint and other files in models/ do not change the results
    (bundle / "models" / "last_checkpoint_40.pt").write_bytes(b"training state")
    (bundle / "models" / "model.ts").write_bytes(b"an export")
    assert bundle_hash(bundle) == first

    # the configs and the weights do
    inference = bundle / "configs" / "inference.json"
    inference.write_text(inference.read_text().replace('"overlap"', '"overlap" ', 1) + "\n")
    edited = bundle_hash(bundle)
    assert edited != first
    other = tmp_path / "other.pt"
    other.write_bytes((bundle / "models" / "model.pt").read_bytes() + b"\0")
    assert bundle_hash(bundle, other) not in (first, edited)
    assert bundle_hash(bundle, bundle / "models" / "model.pt") == edited


def test_the_model_records_the_bundle_hash_of_its_weights(tmp_path):
    """BundleModel reads its weights once and derives the same hash as bundle_hash."""
    other = tmp_path / "model.pt"
    shutil.copy(BUNDLE / "models" / "model.pt", other)
    with open(other, "ab") as f:
        f.write(b"\0")  # a zip member's trailing bytes: torch still loads it, the hash differs
    assert BundleModel(BUNDLE).bundle_sha256 == bundle_hash(BUNDLE)
    model = BundleModel(BUNDLE, weights=other)
    assert model.bundle_sha256 == bundle_hash(BUNDLE, other) != bundle_hash(BUNDLE)
