// The tutorial's client: every `chat message` from the server is one list item, and the form
// emits what is typed. `io()` with no URL connects to the server that served the page.
const socket = io();
const messages = document.getElementById('messages');
const form = document.getElementById('form');
const input = document.getElementById('input');

function show(text) {
  const item = document.createElement('li');
  item.textContent = text; // text only, never HTML
  messages.append(item);
  item.scrollIntoView({ block: 'end' });
}

form.addEventListener('submit', (event) => {
  event.preventDefault();
  const text = input.value;
  if (text.trim() === '') return;
  socket.emit('chat message', text);
  input.value = '';
});

socket.on('chat message', show);
