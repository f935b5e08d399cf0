from __future__ import annotations

import json

import pytest

from chatterbox_cli.languages import LANGUAGES, Detection, detect_language
from chatterbox_cli.text import chunk_text, estimate_tokens, language_code, normalize, split_sentences

# ---- detection

SENTENCES: dict[str, list[str]] = {
    "ar": ["مرحبا، كيف حالك اليوم؟ أنا بخير، شكرا لك.", "ذهبت إلى السوق مع أخي صباح الأمس."],
    "da": [
        "Jeg har ikke set ham i dag, men han kommer nok i morgen. Hvad synes du om det?",
        "Vi blev hjemme hele dagen, fordi det regnede meget.",
    ],
    "de": [
        "Ich weiß nicht, ob er heute noch kommt, aber wir warten auf ihn.",
        "Das Wetter ist schön, und die Kinder spielen im Garten.",
    ],
    "el": ["Καλημέρα, πώς είσαι σήμερα; Ο καιρός είναι πολύ ωραίος.", "Θα πάμε στη θάλασσα το Σάββατο."],
    "en": [
        "The weather was lovely this morning, so we walked to the market.",
        "She said that it is not too late to learn something new.",
    ],
    "es": [
        "¿Dónde está la estación de tren? Necesito llegar a Madrid mañana.",
        "Mi hermano vive en la ciudad y trabaja en un hospital muy grande.",
    ],
    "fi": [
        "Minä en tiedä, mitä hän sanoi, mutta se oli tärkeää.",
        "Tämä kirja on todella hyvä, ja luen sen myös uudelleen.",
    ],
    "fr": [
        "Je ne sais pas si elle viendra ce soir, mais nous l'attendons avec impatience.",
        "Le petit chat dort sur le canapé dans la maison.",
    ],
    "he": ["שלום, מה שלומך היום? אני שמח לראות אותך.", "הלכנו לים ביום שבת עם כל המשפחה."],
    "hi": ["मैं आज बाजार जा रहा हूँ। क्या तुम मेरे साथ चलोगे?", "भारत एक बहुत बड़ा देश है।"],
    "it": [
        "Non so se lui verrà stasera, ma la cena è già pronta.",
        "Questo libro è molto bello e lo leggo anche in treno.",
    ],
    "ja": ["今日はとても良い天気ですね。散歩に行きましょう。", "コーヒーをください。"],
    "ko": ["안녕하세요. 오늘 날씨가 정말 좋네요.", "저는 매일 아침 공원에서 달리기를 합니다."],
    "ms": [
        "Saya tidak tahu di mana dia tinggal, tetapi rumahnya dekat dengan sekolah itu.",
        "Mereka akan pergi ke pasar pada hari Sabtu.",
    ],
    "nl": [
        "Ik weet niet of hij vandaag nog komt, maar we wachten op hem.",
        "Het is een mooie dag en de kinderen spelen buiten.",
    ],
    "no": [
        "Jeg vet ikke hva han sa, men det var noe viktig. Hun ble veldig glad.",
        "Vi har det fint her, og været er mye bedre nå.",
    ],
    "pl": [
        "Nie wiem, czy on dzisiaj przyjdzie, ale czekamy na niego z niecierpliwością.",
        "To jest bardzo dobra książka i czytam ją już drugi raz.",
    ],
    "pt": [
        "Não sei se ele vem hoje, mas a família está à espera dele com muita emoção.",
        "Eu gosto de café com leite pela manhã.",
    ],
    "ru": ["Я не знаю, придёт ли он сегодня, но мы его ждём.", "Москва — столица России."],
    "sv": [
        "Jag vet inte om han kommer i dag, men vi väntar på honom till klockan åtta.",
        "Det är en vacker dag och barnen leker i trädgården.",
    ],
    "sw": [
        "Mimi ni mwalimu na ninafundisha katika shule ya msingi kwa miaka mingi sana.",
        "Watoto wanacheza nje kwa sababu hali ya hewa ni nzuri leo.",
    ],
    "tr": [
        "Bugün gelip gelmeyeceğini bilmiyorum, ama onu bekliyoruz ve çok merak ediyoruz.",
        "Bu kitap çok güzel, ben de okumak istiyorum.",
    ],
    "zh": ["今天天气很好，我们去公园散步吧。你觉得怎么样？", "我喜欢喝茶，不喜欢喝咖啡。"],
}


def test_every_language_has_sentences():
    assert sorted(SENTENCES) == sorted(LANGUAGES)
    assert len(LANGUAGES) == 23


@pytest.mark.parametrize(
    ("code", "sentence"), [(code, s) for code, sentences in SENTENCES.items() for s in sentences]
)
def test_detects_natural_sentences(code, sentence):
    detection = detect_language(sentence)
    assert isinstance(detection, Detection)
    assert detection.code == code, detection.reason
    assert detection.reason


def test_detection_is_frozen():
    detection = detect_language("Hello")
    with pytest.raises(AttributeError):
        detection.code = "de"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "reason_part"),
    [
        ("안녕하세요", "Hangul"),
        ("こんにちは", "Hiragana/Katakana"),
        ("中华人民共和国", "Han"),
        ("Straße", "ß"),
        ("Ich weiß es nicht und der Hund auch nicht.", "German common words (ich, es, nicht)"),
    ],
)
def test_reason_names_the_evidence(text, reason_part):
    assert reason_part in detect_language(text).reason


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("東京タワーに行きました。", "ja"),  # Han with kana is Japanese
        ("東京大学", "zh"),  # Han alone is Chinese
        ("我们明天去 Starbucks 喝咖啡。", "zh"),  # a Latin brand inside Chinese
        ("The word 愛 means love in Japanese.", "en"),  # one Han character inside English
        ("Привет, мир! Hello.", "ru"),
        ("한국어와 日本語", "ko"),  # Hangul with Han, no kana
        ("Το iPhone είναι ακριβό.", "el"),
    ],
)
def test_mixed_scripts_go_to_the_script_with_most_letters(text, code):
    assert detect_language(text).code == code


@pytest.mark.parametrize("text", ["", "12345 !!! ???", "Hello", "OK, Bob.", "Tokyo"])
def test_defaults_to_english_without_evidence(text):
    detection = detect_language(text)
    assert detection.code == "en"
    assert "default" in detection.reason


@pytest.mark.parametrize(
    "text",
    [
        "I saw a man with a dog.",
        "He said that he loves me.",
        "I met José at the café in São Paulo and it was great.",
    ],
)
def test_english_with_foreign_names_or_short_words_stays_english(text):
    assert detect_language(text).code == "en"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("Jeg ved ikke hvad han sagde til mig.", "da"),
        ("Jeg vet ikke hva han sa til meg.", "no"),
        ("Hun blev glad.", "da"),
        ("Hun ble glad.", "no"),
        ("Det är bra, och jag är glad.", "sv"),
    ],
)
def test_scandinavian_languages_are_told_apart_by_their_own_words(text, code):
    assert detect_language(text).code == code


def test_letters_alone_decide_when_there_are_no_common_words():
    assert detect_language("Łódź").code == "pl"
    assert detect_language("Ağaçlar yeşil").code == "tr"
    assert detect_language("Mañana").code == "es"


# ---- language codes


def test_language_code_maps_english_to_none_and_rejects_unknown_codes():
    assert language_code(None) is None
    assert language_code("en") is None
    assert language_code("EN") is None
    assert language_code("ZH") == "zh"
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        language_code("xx")
    with pytest.raises(ValueError):
        split_sentences("Hello.", "english")


# ---- sentence splitting


def test_chinese_splits_on_full_width_marks_without_spaces():
    paragraph = "今天天气很好。我们去公园散步吧！你觉得怎么样？好的。"
    assert split_sentences(paragraph, "zh") == [
        "今天天气很好。",
        "我们去公园散步吧！",
        "你觉得怎么样？",
        "好的。",
    ]


def test_japanese_splits_on_marks_and_keeps_closing_brackets():
    paragraph = "今日はいい天気ですね。「はい、そうですね。」彼は言った！"
    assert split_sentences(paragraph, "ja") == [
        "今日はいい天気ですね。",
        "「はい、そうですね。」",
        "彼は言った！",
    ]


def test_cjk_commas_do_not_end_sentences():
    assert split_sentences("我喜欢喝茶，不喜欢喝咖啡、也不喜欢喝酒。", "zh") == [
        "我喜欢喝茶，不喜欢喝咖啡、也不喜欢喝酒。"
    ]


def test_cjk_marks_are_not_sentence_ends_without_a_language():
    paragraph = "今天天气很好。我们去公园散步吧！"
    assert split_sentences(paragraph) == [paragraph]
    assert split_sentences(paragraph, "en") == [paragraph]


def test_arabic_splits_on_question_mark_and_urdu_full_stop_not_on_comma():
    paragraph = "مرحبا، كيف حالك؟ أنا بخير۔ شكرا لك."
    assert split_sentences(paragraph, "ar") == ["مرحبا، كيف حالك؟", "أنا بخير۔", "شكرا لك."]


def test_arabic_question_mark_needs_no_following_space():
    assert split_sentences("كيف حالك؟أنا بخير.", "ar") == ["كيف حالك؟", "أنا بخير."]


def test_hindi_splits_on_danda_and_double_danda():
    paragraph = "मैं आज बाजार जा रहा हूँ। क्या तुम चलोगे? हाँ॥ ठीक है।"
    assert split_sentences(paragraph, "hi") == [
        "मैं आज बाजार जा रहा हूँ।",
        "क्या तुम चलोगे?",
        "हाँ॥",
        "ठीक है।",
    ]


@pytest.mark.parametrize("mark", [";", "\u037e"])
def test_greek_question_mark_splits_only_in_greek(mark):
    paragraph = f"Τι κάνεις{mark} Είμαι καλά. Εσύ{mark}"
    assert split_sentences(paragraph, "el") == [f"Τι κάνεις{mark}", "Είμαι καλά.", f"Εσύ{mark}"]
    assert split_sentences(paragraph) == [f"Τι κάνεις{mark} Είμαι καλά.", f"Εσύ{mark}"]
    assert split_sentences(paragraph, "de") == [f"Τι κάνεις{mark} Είμαι καλά.", f"Εσύ{mark}"]


def test_greek_keeps_the_english_abbreviation_rules_for_periods():
    assert split_sentences("Ο Dr. Παπαδόπουλος ήρθε. Τι ώρα είναι;", "el") == [
        "Ο Dr. Παπαδόπουλος ήρθε.",
        "Τι ώρα είναι;",
    ]


@pytest.mark.parametrize("language", [None, "en"])
def test_english_splitting_is_unchanged(language):
    assert split_sentences("Dr. Smith arrived at 5 p.m. He sat down. Why? I don't know.", language) == [
        "Dr. Smith arrived at 5 p.m.",
        "He sat down.",
        "Why?",
        "I don't know.",
    ]
    assert split_sentences("It costs 3.5 dollars, e.g. a coffee... and then some.", language) == [
        "It costs 3.5 dollars, e.g. a coffee... and then some."
    ]


def test_latin_languages_keep_english_rules():
    assert split_sentences("Ich bin müde. Du bist wach! Wirklich?", "de") == [
        "Ich bin müde.",
        "Du bist wach!",
        "Wirklich?",
    ]


# ---- chunking


def test_chinese_chunks_join_without_spaces_and_respect_the_bound():
    text = "今天天气很好。我们去公园散步吧！你觉得怎么样？" * 4
    chunks = chunk_text(text, 80, language="zh")
    assert "".join(chunks) == text
    assert all(" " not in chunk for chunk in chunks)
    assert all(estimate_tokens(normalize(chunk, "zh"), "zh") <= 80 for chunk in chunks)
    assert len(chunks) > 1


def test_chinese_sentences_are_separate_chunks_when_packing_is_small():
    text = "今天天气很好。我们去公园散步吧！你觉得怎么样？"
    assert chunk_text(text, language="zh", pack_tokens=8) == [
        "今天天气很好。",
        "我们去公园散步吧！",
        "你觉得怎么样？",
    ]


def test_long_chinese_sentence_is_cut_at_full_width_commas():
    text = "我们明天早上八点出发，先去博物馆看展览，然后去公园散步，晚上再回家吃饭。"
    chunks = chunk_text(text, 60, language="zh", pack_tokens=8)
    assert "".join(chunks) == text
    assert all(chunk.endswith(("，", "。")) for chunk in chunks)


def test_arabic_chunks_keep_their_spaces():
    text = "مرحبا، كيف حالك؟ أنا بخير۔ شكرا لك."
    assert chunk_text(text, 150, language="ar") == [text]
    assert chunk_text(text, 150, language="ar", pack_tokens=8) == [
        "مرحبا، كيف حالك؟",
        "أنا بخير۔",
        "شكرا لك.",
    ]


def test_long_arabic_sentence_is_cut_at_the_arabic_comma():
    text = "ذهبت إلى السوق صباح الأمس، واشتريت الخبز والحليب والفواكه الطازجة"
    chunks = chunk_text(text, 40, language="ar")
    assert chunks[0].endswith("،")
    assert " ".join(chunks) == text


def test_hindi_chunks_split_on_danda():
    text = "मैं आज बाजार जा रहा हूँ। क्या तुम मेरे साथ चलोगे?"
    assert chunk_text(text, language="hi", pack_tokens=8) == [
        "मैं आज बाजार जा रहा हूँ।",
        "क्या तुम मेरे साथ चलोगे?",
    ]


@pytest.mark.parametrize("language", [None, "en"])
def test_english_chunking_is_unchanged(language):
    assert chunk_text("One. Two. Three.", language=language) == ["One. Two. Three."]
    assert chunk_text("One.\n\nTwo.", language=language) == ["One.", "Two."]
    text = "Dr. Smith went home. He was tired; he slept, and then he woke up early the next day."
    assert chunk_text(text, 20, pack_tokens=10, language=language) == chunk_text(text, 20, pack_tokens=10)
    assert chunk_text(text, 20, pack_tokens=10) == [  # what the English-only chunker has always given
        "Dr. Smith went home.",
        "He was tired;",
        "he slept, and",
        "then he woke up",
        "early the next day.",
    ]


# ---- token estimate


def test_estimate_counts_han_korean_and_accents_per_character():
    # One token for the language tag, then per character.
    assert estimate_tokens("你好", "zh") == 1 + 10  # five per Han character (Cangjie codes)
    assert estimate_tokens("你好", "ja") == 1 + 6
    assert estimate_tokens("하", "ko") == 1 + 2  # two jamo
    assert estimate_tokens("한", "ko") == 1 + 3  # three jamo
    assert estimate_tokens("Héllo", "fr") == 1 + 6  # e + combining accent after NFKD
    assert estimate_tokens("مرحبا", "ar") == 1 + 5


def test_estimate_for_english_is_unchanged():
    assert estimate_tokens("Hello there.") == estimate_tokens("Hello there.", "en") == 8


# ---- normalisation


def test_normalize_without_language_is_the_english_reference():
    assert normalize("你好") == "你好."
    assert normalize("你好。") == "你好。."
    assert normalize("Τι κάνεις;") == "Τι κάνεις,"


def test_normalize_multilingual_accepts_cjk_and_script_endings():
    assert normalize("你好。", "zh") == "你好。"
    assert normalize("你好", "zh") == "你好."
    assert normalize("كيف حالك؟", "ar") == "كيف حالك؟"
    assert normalize("यह घर है।", "hi") == "यह घर है।"
    assert normalize("what: now", "de") == "What, now."


def test_normalize_keeps_the_greek_question_mark_only_in_greek():
    assert normalize("Τι κάνεις; Καλά", "el") == "Τι κάνεις; Καλά."
    assert normalize("Τι κάνεις;", "el") == "Τι κάνεις;"
    assert normalize("Ja; nein", "de") == "Ja,  nein."  # the reference's ";" -> ", " keeps the space


# --- chatterbox languages ----------------------------------------------------------------------------


def test_languages_command_lists_every_code_and_its_extra(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from chatterbox_cli.cli import run

    assert run(["languages", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["languages"]
    assert [row["code"] for row in listed] == list(LANGUAGES)
    assert {row["code"]: row["extra"] for row in listed if row["extra"]} == {"ja": "ja", "zh": "zh"}
    real = importlib.util.find_spec
    # the world's edge: pykakasi not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "pykakasi" else real(name))
    assert run(["languages"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "ja  Japanese    needs pip install 'chatterbox-cli[ja]' (not installed)" in lines
    assert "zh  Chinese     needs pip install 'chatterbox-cli[zh]'" in lines
    assert "fr  French" in lines and len(lines) == 23
