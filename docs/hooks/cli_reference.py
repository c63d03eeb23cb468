"""MkDocs hook: the trainer's command-line reference, generated at build time from its own argparse parser
(``timm_ensembles.train.get_args_parser``), so that the page cannot drift from the flags.

A page asks for it with the line ``<!-- cli-reference: timm_ensembles.train -->``; the hook replaces it with one table
per argument group (flags, default, help).
"""
import argparse
import html
import importlib
import re
import sys
from pathlib import Path

MARKER = re.compile(r'^<!-- cli-reference: ([\w.]+) -->$', re.MULTILINE)
# the characters that Markdown would read as markup in a help text (escaped with a backslash)
_MARKUP = re.compile(r'([\\`*_\[\]|])')


def on_config(config):
    # the parser of this checkout, as mkdocstrings renders this checkout (its paths: ['.']), whatever is installed
    root = str(Path(config.config_file_path).resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return config


def on_page_markdown(markdown, page, config, files):
    return MARKER.sub(lambda m: cli_reference(importlib.import_module(m.group(1)).get_args_parser()), markdown)


def _text(text) -> str:
    return _MARKUP.sub(r'\\\1', html.escape(str(text), quote=False))


def _code(text: str) -> str:
    return f'<code>{html.escape(text, quote=False)}</code>'


def _flags(action: argparse.Action) -> str:
    """The action's spellings and the values it takes, as argparse's usage writes them."""
    value = ''
    if action.nargs != 0:
        if isinstance(action.metavar, tuple):
            value = ' '.join(action.metavar)
        else:
            name = action.metavar or ('{' + ','.join(map(str, action.choices)) + '}' if action.choices
                                      else action.dest.upper())
            value = {None: name, '?': f'[{name}]', '*': f'[{name} ...]', '+': f'{name} [{name} ...]'}.get(
                action.nargs, ' '.join([name] * action.nargs) if isinstance(action.nargs, int) else name)
        value = f' {value}'
    return ', '.join(_code(f'{s}{value}') for s in action.option_strings)


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, '', [], {}, argparse.SUPPRESS):
        return ''
    default = ' '.join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
    return _code(str(default))


def cli_reference(parser: argparse.ArgumentParser) -> str:
    """Markdown tables of ``parser``'s options, one per argument group, in the parser's order."""
    out = []
    for group in parser._action_groups:  # argparse has no public accessor for its groups (sphinx-argparse reads these)
        actions = [a for a in group._group_actions if a.option_strings and a.help != argparse.SUPPRESS]
        if not actions:
            continue
        title = 'Options' if group.title in ('options', 'optional arguments') else group.title
        out += [f'### {title}', '', '| flag | default | description |', '|---|---|---|']
        for action in actions:
            help_text = (action.help or '') % dict(vars(action), prog=parser.prog)  # argparse's own expansion
            out.append(f'| {_flags(action)} | {_default(action)} | {_text(help_text)} |')
        out.append('')
    return '\n'.join(out)
