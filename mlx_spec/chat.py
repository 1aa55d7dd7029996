"""The chat loop of `mlx-spec chat`: a conversation whose KV caches live across turns.

`ChatSession.handle(line)` runs one input line (a /command or a turn); `interact` is the terminal around it.
"""

import os
import sys
import termios
import tty
from contextlib import closing, contextmanager, nullcontext

from .cache import make_prompt_cache, reuse_prefix
from .generate import stream_generate
from .load import model_name
from .options import MAX_DRAFT_TOKENS, GenerationOptions, parse_num_draft_tokens
from .stats import GenerationStats

GREEN, CYAN, MAGENTA, DIM, RESET = "\x1b[32m", "\x1b[36m", "\x1b[35m", "\x1b[2m", "\x1b[0m"
COLORS = {"lookup": CYAN, "mtp": MAGENTA}  # an accepted draft token's colour by its source; else GREEN
PROMPT = ">>> "
LEAVE_HINT = "(Ctrl-D or /quit leaves)"


def use_color(stream, no_color: bool = False) -> bool:
    """Colour only on a terminal, unless --no-color or NO_COLOR (https://no-color.org) says otherwise."""
    return not no_color and not os.environ.get("NO_COLOR") and stream.isatty()


def paint(text: str, from_draft: bool, color: bool, source: str | None = "draft") -> str:
    """Draft tokens in green, tokens copied from the conversation in cyan, those of the main model's MTP layer
    in magenta, the main model's own tokens plain."""
    if not (color and from_draft and text):
        return text
    return f"{COLORS.get(source, GREEN)}{text}{RESET}"


LEGEND = f"{GREEN}green{RESET}: draft tokens the main model accepted; {CYAN}cyan{RESET}: copied from the conversation"
MTP_LEGEND = (
    f"{MAGENTA}magenta{RESET}: drafted by the main model's MTP layer and accepted; "
    f"{CYAN}cyan{RESET}: copied from the conversation"
)


def legend(draft_model) -> str:
    """What the colours mean with this draft (a model, None, or "mtp")."""
    return MTP_LEGEND if isinstance(draft_model, str) else LEGEND


def conversation_tokens(tokenizer, messages, system_prompt: str | None = None):
    """Token ids of the conversation rendered by the chat template, ending with the assistant's turn opening."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return tokenizer.apply_chat_template(system + messages, add_generation_prompt=True)


class ChatSession:
    """A conversation: its messages, the CachePair of both models, the settings; `handle` runs one line.

    Each turn renders the whole conversation with the chat template, keeps the
    cached prefix it shares with the caches' tokens and prefills only the rest.
    """

    def __init__(
        self,
        model,
        tokenizer,
        draft_model=None,
        settings: GenerationOptions | None = None,
        system_prompt: str | None = None,
        out=None,
        color: bool = False,
    ):
        self.model, self.tokenizer, self.draft_model = model, tokenizer, draft_model
        self.settings = settings or GenerationOptions()
        self.system_prompt = system_prompt
        self.out = out or sys.stdout
        self.color = color
        if not tokenizer.has_chat_template:
            raise ValueError(
                "the model has no chat template, which chat needs "
                "(`mlx-spec generate --ignore-chat-template` works without)"
            )
        # A rotating cache (max_kv_size) never fills up; otherwise the model's trained length is the limit.
        args = getattr(model, "args", None)
        self.context_limit = None if self.settings.max_kv_size else getattr(args, "max_position_embeddings", None)
        self.totals = GenerationStats()
        self.num_turns = 0
        self.reset()

    # --- commands ----------------------------------------------------------
    COMMANDS = {
        "/help": ("", "this list"),
        "/reset": ("", "start a new conversation (caches cleared)"),
        "/stats": ("", "totals for this session"),
        "/draft": (" N|auto", "draft N tokens per round, or choose each round"),
        "/temp": (" T", "sampling temperature (0 = greedy)"),
        "/system": (" TEXT", "set the system prompt (no TEXT: remove it)"),
        "/quit": ("", "leave (also Ctrl-D)"),
    }

    def handle(self, line: str) -> bool:
        """Run one line of input: a /command or the user's next message. False when the session ends."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.turn(line)
            return True
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name == "/quit":
            return False
        if name == "/help":
            for command, (usage, text) in self.COMMANDS.items():
                self.say(f"  {command + usage:<14} {text}")
        elif name == "/reset":
            self.reset()
            self.say("new conversation")
        elif name == "/stats":
            self.say(f"{self.num_turns} turns\n{self.totals.summary()}")
        elif name == "/draft":
            self.set_draft(arg)
        elif name == "/temp":
            self.set_temp(arg)
        elif name == "/system":
            self.system_prompt = arg or None
            self.say("system prompt set" if arg else "system prompt removed")
        else:
            self.say(f"unknown command {name}: /help lists the commands")
        return True

    def reset(self):
        self.messages = []
        self.cache = make_prompt_cache(self.model, self.draft_model, self.settings.max_kv_size)

    def set_draft(self, arg: str):
        if self.draft_model is None:
            self.say("no draft model in this session")
        else:
            try:
                self.settings = self.settings.replace(num_draft_tokens=parse_num_draft_tokens(arg))
            except ValueError:
                self.say(f"/draft takes 'auto' or a whole number from 1 to {MAX_DRAFT_TOKENS}, got {arg!r}")
                return
            self.say("choosing the draft length each round" if arg == "auto" else f"drafting {arg} tokens per round")

    def set_temp(self, arg: str):
        try:
            self.settings = self.settings.replace(temp=float(arg))
        except ValueError:
            self.say(f"/temp takes a number >= 0, got {arg!r}")
        else:
            self.say(f"temperature {self.settings.temp}")

    # --- a turn ------------------------------------------------------------
    def turn(self, text: str):
        """Reply to the user's message `text`, streaming; Ctrl-C stops the reply and keeps what was shown."""
        messages = self.messages + [{"role": "user", "content": text}]
        tokens = conversation_tokens(self.tokenizer, messages, self.system_prompt)
        max_tokens = self.settings.max_tokens
        if self.context_limit is not None:
            room = self.context_limit - len(tokens)
            if room <= 0:
                self.say(
                    f"context full: the conversation would be {len(tokens)} tokens, the model's limit is "
                    f"{self.context_limit}; /reset starts a new conversation"
                )
                return
            max_tokens = min(max_tokens, room)
        new_tokens = self.reuse_cache(tokens)
        stats = GenerationStats()
        reply, stopped = "", False
        kwargs = self.settings.as_kwargs()
        kwargs.update(max_tokens=max_tokens, prompt_cache=self.cache, stats=stats, draft_model=self.draft_model)
        try:
            with closing(stream_generate(self.model, self.tokenizer, new_tokens, **kwargs)) as responses:
                for response in responses:
                    self.out.write(paint(response.text, response.from_draft, self.color, response.source))
                    self.out.flush()
                    reply += response.text
        except KeyboardInterrupt:  # the generator's cleanup has left the caches consistent
            stopped = True
        self.messages = messages + [{"role": "assistant", "content": reply}]
        self.num_turns += 1
        self.totals.add(stats)
        self.out.write("\n")
        if stopped:
            self.say("[stopped]")
        self.say(self.turn_line(stats), dim=True)
        if self.context_limit is not None and len(self.cache.tokens) >= self.context_limit:
            self.say(
                f"context full: the conversation reached the model's limit of {self.context_limit} tokens; "
                "/reset starts a new conversation"
            )

    def reuse_cache(self, tokens):
        """Truncate the caches to the prefix they share with `tokens`; return the tokens left to prefill."""
        num_kept = reuse_prefix(self.cache, tokens)
        if num_kept is None:  # a rotating cache cannot go back that far
            self.cache = make_prompt_cache(self.model, self.draft_model, self.settings.max_kv_size)
            num_kept = 0
        return tokens[num_kept:]

    def turn_line(self, stats: GenerationStats) -> str:
        parts = [f"{stats.generation_tokens} tokens", f"{stats.generation_tps:.1f} tokens/s"]
        if self.draft_model is not None or self.settings.prompt_lookup:
            parts.append(
                f"accepted {stats.accepted_draft_tokens}/{stats.total_draft_tokens} draft tokens "
                f"({100 * stats.acceptance_rate:.1f}%)"
            )
            if stats.lookup_draft_tokens:
                parts.append(f"{stats.lookup_accepted_tokens} copied from the conversation")
            parts.append(f"{stats.mean_tokens_per_round:.2f} tokens per round")
            if self.settings.num_draft_tokens == "auto":
                parts.append(f"draft length {stats.mean_draft_length:.1f} on average")
        parts.append(f"{stats.prompt_tokens} prompt tokens processed")
        return f"[{', '.join(parts)}]"

    # --- output ------------------------------------------------------------
    def say(self, text: str, dim: bool = False):
        if dim and self.color:
            text = f"{DIM}{text}{RESET}"
        self.out.write(text + "\n")
        self.out.flush()

    def intro(self):
        self.say(f"mlx-spec chat\nmain  {model_name(self.model)}")
        if self.draft_model is not None:
            k = self.settings.num_draft_tokens
            per_round = "draft length chosen each round" if k == "auto" else f"{k} draft tokens per round"
            self.say(f"draft {model_name(self.draft_model)}; {per_round}")
        if self.color and (self.draft_model is not None or self.settings.prompt_lookup):
            self.say(f"{legend(self.draft_model)}; plain: the main model's own")
        self.say("/help lists the commands; Ctrl-C stops a reply; Ctrl-D or /quit leaves")


def interact(session: ChatSession, read=None, stop_replies: bool = True) -> int:
    """Read lines until /quit or Ctrl-D; a user error is one line and the chat goes on.

    Args:
        session: the conversation.
        read: `read(prompt) -> line`, raising EOFError at the end of input; by default a line editor
            with history on a terminal (Ctrl-C clears the line), else `input`.
        stop_replies: Ctrl-C during a reply stops it and the chat goes on; False: it ends the chat (sharded,
            where the other ranks cannot stop at the same round).
    """
    terminal = read is None and sys.stdin.isatty() and sys.stdout.isatty()
    if terminal:
        from prompt_toolkit import PromptSession

        read = PromptSession().prompt  # history, line editing; ends its line itself
    elif read is None:
        read = input
    session.intro()
    with typeahead_kept(sys.stdin) if terminal else nullcontext():
        while True:
            try:
                line = read(PROMPT)
            except KeyboardInterrupt:  # as in Python's REPL: the line is dropped, the chat goes on
                session.say(LEAVE_HINT)
                continue
            except EOFError:
                if not terminal:
                    session.out.write("\n")
                return 0
            try:
                if not session.handle(line):
                    return 0
            except KeyboardInterrupt:
                if not stop_replies:
                    raise
                session.say("[stopped]")
            except ValueError as e:
                session.say(f"error: {e}")


@contextmanager
def typeahead_kept(stdin):
    """Between prompts, let the terminal neither echo keys nor interpret them (cbreak mode): what is typed
    while a reply streams stays out of the reply, waiting, and the next prompt reads it as if typed there
    (Enter, backspace, Ctrl-D included). Ctrl-C still interrupts, and the terminal discards nothing then
    (NOFLSH): neither what was typed nor the reply's words written but not yet on the screen, so what a
    stopped reply keeps is what the user sees, however slowly the terminal shows it."""
    fd = stdin.fileno()
    before = termios.tcgetattr(fd)
    tty.setcbreak(fd, termios.TCSANOW)  # TCSANOW, not TCSAFLUSH: what was typed stays
    attributes = termios.tcgetattr(fd)
    attributes[3] |= termios.NOFLSH
    termios.tcsetattr(fd, termios.TCSANOW, attributes)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, before)
