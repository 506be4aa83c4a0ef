"""DistillationTrainer: its loss and gradients equal the distillation loss on the full logits (causal
shift, labels and padding masks), it trains a perturbed student toward the teacher through
Trainer.train (plain and peft LoRA), and bad setups are refused before training."""
import copy

import pytest
import torch

from sdft_kernels import DistillationLoss
from sdft_kernels.models import tiny_random_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from sdft_kernels.trainer import DistillationTrainer  # noqa: E402


def pair(seed=0):
    teacher, tok = tiny_random_model(num_layers=2, hidden_size=32, seed=seed)
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return teacher, student, tok


def batch(vocab, B=3, T=12, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, 9:] = 0                       # padding at the end of row 1
    labels = ids.masked_fill(attn == 0, -100)
    labels[0, :4] = -100                  # a prompt left out of row 0
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def make(student, teacher, tmp_path, **kw):
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3,
                                          max_steps=kw.pop("max_steps", 1), learning_rate=kw.pop("lr", 1e-3),
                                          report_to=[], save_strategy="no", logging_strategy="no",
                                          use_cpu=True, disable_tqdm=True, lr_scheduler_type="constant")
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, **kw)


@pytest.mark.parametrize("loss_kw, ce_weight", [({}, 0.0), ({"divergence": "jsd", "beta": 0.3, "temperature": 2.0}, 0.0),
                                                ({"divergence": "reverse_kl"}, 0.5)])
def test_loss_and_gradients_equal_the_loss_on_full_logits(tmp_path, loss_kw, ce_weight):
    teacher, student, tok = pair()
    b = batch(len(tok))
    tr = make(student, teacher, tmp_path, loss=DistillationLoss(**loss_kw), ce_weight=ce_weight)
    loss = tr.compute_loss(student, b)
    loss.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    # reference: the full logits of both models, the causal shift done by hand
    s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    with torch.no_grad():
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    keep = (b["attention_mask"][:, 1:] == 1) & (b["labels"][:, 1:] != -100)
    ref = DistillationLoss(**loss_kw)(s[:, :-1], t[:, :-1], mask=keep)
    if ce_weight:
        ce = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, s.shape[-1]), b["labels"][:, 1:].reshape(-1))
        ref = ref + ce_weight * ce
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in student.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


class Rows(torch.utils.data.Dataset):
    def __init__(self, vocab, n=12, T=16):
        self.ids = torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(5))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def kl(teacher, student, ids):
    with torch.no_grad():
        return float(DistillationLoss()(student(input_ids=ids).logits, teacher(input_ids=ids).logits))


@pytest.mark.parametrize("lora", [False, True])
def test_training_moves_the_student_toward_the_teacher(tmp_path, lora):
    teacher, student, tok = pair()
    data = Rows(len(tok))
    before = kl(teacher, student, data.ids)
    if lora:
        import peft
        from sdft_kernels.recover import _peft_ignore_old_torchao
        _peft_ignore_old_torchao()  # the benchmarks' torchao peer is older than peft accepts
        student = peft.get_peft_model(student, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                                  "up_proj", "down_proj"]))
    tr = make(student, teacher, tmp_path, max_steps=12, lr=3e-2 if lora else 1e-3)
    tr.train_dataset = data
    tr.train()
    trained = student.merge_and_unload() if lora else student
    after = kl(teacher, trained.eval(), data.ids)
    assert after < (0.9 if lora else 0.7) * before, (before, after)  # measured 0.84x and 0.50x
    assert all(not p.requires_grad for p in teacher.parameters())


class Prompted(torch.utils.data.Dataset):
    """Rows whose prompts (labels -100) and padding differ in length, so micro-batches hold very unequal
    numbers of distilled tokens (10, 2 and 7 here)."""

    def __init__(self, vocab, T=12):
        self.ids = torch.randint(0, vocab, (3, T), generator=torch.Generator().manual_seed(7))
        self.attn = torch.ones(3, T, dtype=torch.long)
        self.attn[2, 9:] = 0
        self.labels = self.ids.masked_fill(self.attn == 0, -100)
        self.labels[1, :9] = -100
        self.labels[0, :1] = -100

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.attn[i], "labels": self.labels[i]}


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_gradient_accumulation_weights_tokens_not_micro_batches(tmp_path, ce_weight):
    """One step of 3 micro-batches of one row each (gradient_accumulation_steps=3) gives the loss and the
    gradient of the single batch of all 3 rows: the mean over all distilled tokens. Averaging the
    micro-batches' means instead (the Trainer's default for a custom loss) is far off here."""
    teacher, student, tok = pair()
    data = Prompted(len(tok))
    full = {k: torch.stack([data[i][k] for i in range(3)]) for k in ("input_ids", "attention_mask", "labels")}
    ref_tr = make(copy.deepcopy(student), teacher, tmp_path, ce_weight=ce_weight)
    ref_loss = ref_tr.compute_loss(ref_tr.model, full)
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in ref_tr.model.named_parameters()}
    ref_tr.model.zero_grad()
    # the test can tell them apart: the mean of the rows' means has a gradient far from the token mean's
    (sum(ref_tr.compute_loss(ref_tr.model, {k: v[i:i + 1] for k, v in full.items()}) for i in range(3)) / 3).backward()
    g_ref = torch.cat([g.flatten() for g in ref.values()])
    g_rows = torch.cat([p.grad.flatten() for p in ref_tr.model.parameters()])
    assert (g_rows - g_ref).norm() > 0.2 * g_ref.norm()

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "ga"), per_device_train_batch_size=1,
                                          gradient_accumulation_steps=3, max_steps=1, learning_rate=1.0,
                                          optim="sgd", max_grad_norm=0.0, weight_decay=0.0, report_to=[],
                                          save_strategy="no", logging_strategy="no", use_cpu=True,
                                          disable_tqdm=True, lr_scheduler_type="constant")
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    out = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                              ce_weight=ce_weight).train()
    assert out.training_loss == pytest.approx(float(ref_loss), rel=1e-5)
    for n, p in student.named_parameters():  # SGD, lr 1: the update is minus the accumulated gradient
        torch.testing.assert_close(before[n] - p.detach(), ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_bad_setups_are_refused(tmp_path):
    teacher, student, tok = pair()
    with pytest.raises(TypeError, match="loss"):
        make(student, teacher, tmp_path, loss=torch.nn.MSELoss())
    with pytest.raises(ValueError, match="ce_weight"):
        make(student, teacher, tmp_path, ce_weight=-1.0)
    other, _ = tiny_random_model(num_layers=2, hidden_size=32)
    other.resize_token_embeddings(len(tok) + 8)
    with pytest.raises(ValueError, match="vocabulary"):
        make(student, other, tmp_path)
    # a model whose head does not read the recorded last hidden state: refused at the first batch
    tr = make(student, teacher, tmp_path)
    student.get_output_embeddings().weight  # noqa: B018
    student.lm_head = torch.nn.Sequential(torch.nn.LayerNorm(32), student.lm_head)
    student.get_output_embeddings = lambda: student.lm_head[1]
    with pytest.raises(ValueError, match="logits are not its final hidden states times its output head"):
        tr.compute_loss(student, batch(len(tok)))


def test_trains_under_bf16_autocast(tmp_path):
    """TrainingArguments(bf16=True): the forward runs under autocast; the head check and the loss still work."""
    teacher, student, tok = pair()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, max_steps=2,
                                          report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, bf16=True)
    w0 = student.model.layers[0].mlp.up_proj.weight.detach().clone()
    DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Rows(len(tok))).train()
    assert not torch.equal(student.model.layers[0].mlp.up_proj.weight, w0)


@pytest.mark.cuda
def test_loss_and_gradients_on_cuda_match_cpu(tmp_path):
    teacher, student, tok = pair()
    b = batch(len(tok))
    res = {}
    for dev in ("cpu", "cuda"):
        s, t = copy.deepcopy(student).to(dev), copy.deepcopy(teacher).to(dev)
        args = transformers.TrainingArguments(output_dir=str(tmp_path / dev), report_to=[], use_cpu=dev == "cpu")
        tr = DistillationTrainer(model=s, teacher_model=t, args=args, ce_weight=0.3)
        loss = tr.compute_loss(s, {k: v.to(dev) for k, v in b.items()})
        loss.backward()
        res[dev] = (float(loss), {n: p.grad.cpu() for n, p in s.named_parameters()})
    assert res["cuda"][0] == pytest.approx(res["cpu"][0], rel=1e-4)
    for n, g in res["cpu"][1].items():
        torch.testing.assert_close(res["cuda"][1][n], g, rtol=1e-3, atol=1e-5, msg=n)
