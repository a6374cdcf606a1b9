// The annotation desk's keyboard: a key press clicks the button whose data-keys lists it. Every button is a plain
// form submit, so the desk works without this script; it adds nothing but the keys.
"use strict";

(function () {
  var sent = false;

  function typing(element) {
    return element && (element.tagName === "TEXTAREA" || element.tagName === "INPUT" || element.isContentEditable);
  }

  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && typing(document.activeElement)) {
      document.activeElement.blur();
      return;
    }
    if (sent || event.ctrlKey || event.metaKey || event.altKey || event.repeat || typing(event.target)) {
      return;
    }
    var key = event.key.toLowerCase();
    var buttons = document.querySelectorAll("button[data-keys]");
    for (var i = 0; i < buttons.length; i++) {
      if (buttons[i].getAttribute("data-keys").split(" ").indexOf(key) >= 0) {
        event.preventDefault();
        // One press, one post: a second key before the next page arrives would label the next item unseen.
        sent = true;
        buttons[i].click();
        return;
      }
    }
  });
})();
