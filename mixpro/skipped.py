"""Name the file behind timm's "Skipped sample (index N)" warning.

timm's ``ImageDataset`` skips an image it cannot read and uses the next sample in its place, logging
only the sample index and Pillow's message, which names the file for some errors (unidentified image)
but not for others (truncated image). Finding the file then means mapping the index through the sorted
folder list by hand. ``name_skipped_files`` wraps a dataset's reader so that each read remembers its
sample; a filter on timm's logger puts that sample's path into the warning, with a count per process.
"""
import logging
import os
import re

_SKIP_MESSAGE = re.compile(r'Skipped sample \(index (\d+)\)\.\s*(.*)', re.DOTALL)
_last_read = None            # (reader, index) of the latest read in this process (one thread per worker)
_skipped_here = 0            # images skipped by this process (a loader worker or the main process)


class _RememberingReader:
    """A timm reader that remembers the last index read; everything else is the wrapped reader's."""

    def __init__(self, reader):
        self.reader = reader

    def __getitem__(self, index):
        global _last_read
        _last_read = (self.reader, index)   # before the read: a missing file fails inside it
        return self.reader[index]

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


def name_skipped_files(dataset):
    """Make timm's skip warnings for ``dataset`` name the file. Returns ``dataset``."""
    reader = getattr(dataset, 'reader', None)
    if reader is not None and not isinstance(reader, _RememberingReader):
        dataset.reader = _RememberingReader(reader)
    return dataset
