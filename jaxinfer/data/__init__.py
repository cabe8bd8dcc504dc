"""Training data: text sources, tokenizer, cached tokenized corpus, packing and a resumable batch iterator."""

from jaxinfer.data.corpus import EOS_TOKEN, Corpus, train_bpe, unigram_entropy
from jaxinfer.data.dataset import DataConfig, Dataset, prepare_dataset
from jaxinfer.data.packing import BatchIterator, Split, eval_batches, make_split, split_documents
from jaxinfer.data.sources import list_files, read_documents, stdlib_root

__all__ = ["EOS_TOKEN", "BatchIterator", "Corpus", "DataConfig", "Dataset", "Split", "eval_batches",
           "list_files", "make_split", "prepare_dataset", "read_documents", "split_documents", "stdlib_root",
           "train_bpe", "unigram_entropy"]
