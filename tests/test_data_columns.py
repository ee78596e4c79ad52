import logging

import datasets
import pytest
import torch
import transformers

from functrain.data.columns import remove_unused_columns, signature_columns
from functrain.data.collators import DataCollatorWithPadding


class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(50, 8)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.emb(input_ids)


def _rows():
    return [{"input_ids": [1, 2, 3][: i + 1], "attention_mask": [1] * (i + 1), "text": "abc"[: i + 1],
             "label": i % 2, "idx": i} for i in range(3)]


def test_signature_columns_hf_model_and_wrappers():
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=2)
    bert = transformers.BertForSequenceClassification(cfg)
    cols = signature_columns(bert, label_names=["extra"])
    assert {"input_ids", "attention_mask", "token_type_ids", "labels", "label", "label_ids", "extra"} <= set(cols)
    assert "kwargs" not in cols and "self" not in cols
    assert signature_columns(torch.compile(Classifier())) == signature_columns(Classifier())


def test_hf_dataset_drops_unused_and_logs_once(caplog):
    ds = datasets.Dataset.from_list(_rows())
    with caplog.at_level(logging.INFO, logger="functrain.data"):
        out = remove_unused_columns(ds, Classifier())
        remove_unused_columns(ds, Classifier())
    assert out.column_names == ["input_ids", "attention_mask", "label"]
    assert ds.column_names == ["input_ids", "attention_mask", "text", "label", "idx"]  # input untouched
    logged = [r for r in caplog.records if "text, idx" in r.getMessage()]
    assert len(logged) == 1
    batch = DataCollatorWithPadding(pad_token_id=0)([out[i] for i in range(3)])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


@pytest.mark.parametrize("kind", ["list", "torch", "torch_iterable", "hf_iterable"])
def test_other_dataset_kinds_filter_per_example(kind):
    rows = _rows()
    if kind == "list":
        ds = rows
    elif kind == "torch":
        class D(torch.utils.data.Dataset):
            def __len__(self):
                return len(rows)

            def __getitem__(self, i):
                return rows[i]
        ds = D()
    elif kind == "torch_iterable":
        class I(torch.utils.data.IterableDataset):
            def __iter__(self):
                return iter(rows)
        ds = I()
    else:
        ds = datasets.Dataset.from_list(rows).to_iterable_dataset()
    out = remove_unused_columns(ds, Classifier(), label_names=["idx"])
    examples = list(out) if kind in ("torch_iterable", "hf_iterable") else [out[i] for i in range(len(rows))]
    assert [sorted(e) for e in examples] == [["attention_mask", "idx", "input_ids", "label"]] * 3
    assert [e["idx"] for e in examples] == [0, 1, 2]


def test_nothing_usable_lists_found_and_expected():
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "foo": [1, 2]})
    with pytest.raises(ValueError, match=r"found columns \['text', 'foo'\].*input_ids"):
        remove_unused_columns(ds, Classifier())


def test_empty_dataset_clear_error():
    with pytest.raises(ValueError, match="empty"):
        remove_unused_columns([], Classifier())


def test_transform_sees_raw_columns():
    # The image-classification flow: a transform builds pixel_values from a raw "image" column.
    raw = datasets.Dataset.from_dict({"image": [[0.0, 1.0], [2.0, 3.0]], "label": [0, 1], "path": ["a", "b"]})

    def transform(batch):
        return {"pixel_values": [torch.tensor(x) * 2 for x in batch["image"]], "label": batch["label"],
                "path": batch["path"]}

    class Vision(torch.nn.Module):
        def forward(self, pixel_values, labels=None):
            return pixel_values

    out = remove_unused_columns(raw.with_transform(transform), Vision())
    assert sorted(out[1]) == ["label", "pixel_values"]
    assert torch.equal(out[1]["pixel_values"], torch.tensor([4.0, 6.0]))
