"""Name the file behind timm's "Skipped sample (index N)" warning, and keep substitutes out of evaluations.

timm's ``ImageDataset`` skips an image it cannot read and uses the next sample in its place, logging
only the sample index and Pillow's message, which names the file for some errors (unidentified image)
but not for others (truncated image). Finding the file then means mapping the index through the sorted
folder list by hand. ``name_skipped_files`` wraps a dataset's reader so that each read remembers its
sample; a filter on timm's logger puts that sample's path into the warning, with a count per process.

In training a substitute image is harmless; in an evaluation it would count its neighbour twice.
``MeasuredSamples`` labels such a sample ``UNREADABLE`` (-1), which the evaluation leaves out and counts.
"""
import logging
import os
import re

import torch

_SKIP_MESSAGE = re.compile(r'Skipped sample \(index (\d+)\)\.\s*(.*)', re.DOTALL)
_last_read = None            # (reader, index) of the latest read in this process (one thread per worker)
_reads = 0                   # reads in this process: more than one for a sample means a substitute
_skipped_here = 0            # images skipped by this process (a loader worker or the main process)
UNREADABLE = -1              # the label of a sample whose own image could not be read


class ReaderWrapper:
    """A timm reader wrapped to change ``__getitem__``; everything else is the wrapped reader's."""

    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader)

    def __getattr__(self, name):
        try:
            reader = self.__dict__['reader']
        except KeyError:            # while unpickling, before __dict__ is filled
            raise AttributeError(name) from None
        return getattr(reader, name)

    def __setattr__(self, name, value):   # settings made on the dataset's reader reach the real one
        if name == 'reader':
            object.__setattr__(self, name, value)
        else:
            setattr(self.reader, name, value)


class _RememberingReader(ReaderWrapper):
    """A timm reader that remembers the last index read."""

    def __getitem__(self, index):
        global _last_read, _reads
        _last_read = (self.reader, index)   # before the read: a missing file fails inside it
        _reads += 1
        return self.reader[index]


def _file_of(reader, index: int) -> str:
    try:
        return os.path.abspath(reader.filename(index, absolute=True))
    except Exception:               # a reader without file names: keep timm's message as it is
        return ''


class _NameSkippedFile(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        global _skipped_here
        match = _SKIP_MESSAGE.match(record.getMessage())
        if match and _last_read is not None and _last_read[1] == int(match.group(1)):
            path = _file_of(*_last_read)
            if path:
                _skipped_here += 1
                record.msg = (f'skipped unreadable image {path} (sample {match.group(1)}; the next sample is '
                              f'used in its place; {_skipped_here} skipped by this process): {match.group(2)}')
                record.args = ()
        return True


# installed on import, so in every process that imports mixpro.data: the training process, the forkserver
# that starts the loader workers (it preloads mixpro.data) and so the workers
logging.getLogger('timm.data.dataset').addFilter(_NameSkippedFile())


class MeasuredSamples(torch.utils.data.Dataset):
    """An evaluation's view of a dataset whose reader ``name_skipped_files`` wrapped: a sample that timm
    replaced by its neighbour (its own image unreadable) gets the label ``UNREADABLE``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        before = _reads
        image, target = self.dataset[index]
        return image, (UNREADABLE if _reads - before > 1 else target)


def measured(dataset):
    """``dataset`` for an evaluation: wrapped in ``MeasuredSamples`` where substitutes can be told apart."""
    return MeasuredSamples(dataset) if isinstance(getattr(dataset, 'reader', None), _RememberingReader) else dataset


def name_skipped_files(dataset):
    """Make timm's skip warnings for ``dataset`` name the file. Returns ``dataset``."""
    reader = getattr(dataset, 'reader', None)
    if reader is not None and not isinstance(reader, _RememberingReader):
        dataset.reader = _RememberingReader(reader)
    return dataset
